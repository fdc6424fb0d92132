"""prompt.py against a re-implementation of upstream's prompt code.

The upstream side below is HuatuoGPT-Vision cli.py's logic (input_moderation,
insert_image_placeholder, get_conv, preprocess_huatuo, tokenizer_image_token)
written again with lists instead of torch tensors, run with the real HF
tokenizers of the tiny 7B (Qwen2 BPE) and 34B (Yi SentencePiece) checkpoints.
"""
from __future__ import annotations

import numpy as np
import pytest

from huatuo_lite.families import llava as family
from huatuo_lite import prompt as pm
from huatuo_lite.backends.base import ImageEmbeds, segments_length
from huatuo_lite.errors import PromptError

transformers = pytest.importorskip("transformers")
IMAGE_TOKEN_INDEX = -200


# ----------------------------------------------------- upstream, again ----
class Upstream:
    """HuatuoChatbot's text path; `add_special` False is cli.py, True is generic LLaVA."""

    def __init__(self, tokenizer, add_special: bool = False):
        self.tokenizer, self.add_special = tokenizer, add_special

    def tokenizer_image_token(self, prompt, image_token_index=IMAGE_TOKEN_INDEX):
        prompt_chunks = [self.tokenizer(chunk, add_special_tokens=self.add_special).input_ids
                         for chunk in prompt.split('<image>')]

        def insert_separator(X, sep):
            return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

        input_ids = []
        offset = 0
        if (len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0
                and prompt_chunks[0][0] == self.tokenizer.bos_token_id):
            offset = 1
            input_ids.append(prompt_chunks[0][0])
        for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
            input_ids.extend(x[offset:])
        return input_ids

    def preprocess_huatuo(self, convs):
        input_ids = []
        convs = [conv for conv in convs if conv['value'] is not None]
        round_num = len(convs) // 2
        for ind in range(round_num):
            h = convs[ind * 2]['value'].strip()
            h = f"<|user|>\n{h}\n"
            g = convs[ind * 2 + 1]['value']
            g = f"<|assistant|>\n{g} \n"
            input_ids += self.tokenizer_image_token(prompt=h)
            input_ids += self.tokenizer(g, add_special_tokens=False, truncation=True).input_ids
        h = convs[-1]['value'].strip()
        h = f"<|user|>\n{h}\n<|assistant|>\n"
        input_ids += self.tokenizer_image_token(prompt=h)
        return input_ids

    @staticmethod
    def input_moderation(t):
        for b in ['<image>', '<s>', '</s>']:
            t = t.replace(b, '')
        return t

    @staticmethod
    def insert_image_placeholder(t, num_images, placeholder='<image>', sep='\n'):
        for _ in range(num_images):
            t = f"{placeholder}{sep}" + t
        return t

    def ids(self, turns):
        """As chat(): history holds [moderated text with placeholders, answer]."""
        convs = []
        for turn in turns:
            text = self.input_moderation(turn.question)
            text = self.insert_image_placeholder(text, turn.n_images)
            convs.append({'from': 'human', 'value': text})
            convs.append({'from': 'gpt', 'value': turn.answer})
        return self.preprocess_huatuo(convs)


CONVERSATIONS = {
    "no_image": [pm.Turn("What is a pneumothorax?")],
    "one_image": [pm.Turn("What abnormality is seen in this chest X-ray?", 1)],
    "two_images": [pm.Turn("Compare the two CT scans of the abdomen.", 2)],
    "six_images": [pm.Turn("Which of these shows a fracture?", 6)],
    "spaces": [pm.Turn("   请描述这张腹部CT图像。  \n", 1)],
    "spaces_no_image": [pm.Turn("  Is there a lesion?  ")],
    "moderated": [pm.Turn("Is <s>this</s> benign?", 1)],
    "multi_turn": [
        pm.Turn("What organ is shown?", 1, "The liver."),
        pm.Turn("Is there a lesion?", 0, "Yes, a 2 cm hypodense lesion.\n"),
        pm.Turn("Compare with this earlier scan.", 2),
    ],
    "multi_turn_odd_answers": [
        pm.Turn("Describe it.", 2, ""),
        pm.Turn("Again, in Chinese.", 0, "肝脏内可见低密度病灶 <image> <|user|>\n"),
        pm.Turn("Thanks?", 1),
    ],
}


@pytest.fixture(scope="module")
def tokenizers(tiny_7b, tiny_34b):
    auto = transformers.AutoTokenizer
    return {
        "qwen2": auto.from_pretrained(tiny_7b),
        "yi_fast": auto.from_pretrained(tiny_34b),
        "yi_slow": auto.from_pretrained(tiny_34b, use_fast=False),
    }


def _ours(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------ rendering ----
def test_render_single_image():
    assert pm.render([pm.Turn("What is shown?", 1)]) == (
        "<|user|>\n<image>\nWhat is shown?\n<|assistant|>\n")


def test_render_two_images_and_no_image():
    assert pm.render([pm.Turn("Compare.", 2)]) == (
        "<|user|>\n<image>\n<image>\nCompare.\n<|assistant|>\n")
    assert pm.render([pm.Turn(" Hello? ")]) == "<|user|>\nHello?\n<|assistant|>\n"


def test_render_multi_turn():
    turns = [pm.Turn("What organ?", 1, "The liver."), pm.Turn("Any lesion?", 0, "No."),
             pm.Turn("And here?", 1)]
    assert pm.render(turns) == (
        "<|user|>\n<image>\nWhat organ?\n<|assistant|>\nThe liver. \n"
        "<|user|>\nAny lesion?\n<|assistant|>\nNo. \n"
        "<|user|>\n<image>\nAnd here?\n<|assistant|>\n")
    assert pm.render(turns) == "".join(p.text for p in pm.render_pieces(turns))


def test_render_keeps_upstream_strip_quirks():
    # Upstream strips after inserting the image lines: inner leading spaces stay.
    assert pm.render([pm.Turn("  q  ", 1)]) == "<|user|>\n<image>\n  q\n<|assistant|>\n"
    assert pm.render([pm.Turn("a <s>b</s>", 0)]) == "<|user|>\na b\n<|assistant|>\n"


def test_split_at_images():
    text = pm.render([pm.Turn("Compare.", 2)])
    assert pm.split_at_images(text) == ["<|user|>\n", "\n", "\nCompare.\n<|assistant|>\n"]
    assert pm.split_at_images("no images") == ["no images"]
    assert len(pm.split_at_images(pm.render([pm.Turn("q", 6)]))) == 7


# ----------------------------------------------------------- token ids ----
@pytest.mark.parametrize("tok_name", ["qwen2", "yi_fast", "yi_slow"])
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_token_layout_equals_upstream(tokenizers, tok_name, case):
    tokenizer, turns = tokenizers[tok_name], CONVERSATIONS[case]
    expected = Upstream(tokenizer).ids(turns)
    ours = pm.prompt_token_layout(turns, _ours(tokenizer))
    assert ours == expected
    assert ours.count(pm.IMAGE_SLOT) == pm.count_images(turns)
    # Generic LLaVA tokenizes chunks with special tokens: the same for these tokenizers.
    assert Upstream(tokenizer, add_special=True).ids(turns) == expected
    with_bos = pm.prompt_token_layout(turns, _ours(tokenizer), tokenizer.bos_token_id)
    assert with_bos == expected


@pytest.mark.parametrize("tok_name", ["qwen2", "yi_fast"])
def test_single_turn_text_layout_equals_turn_layout(tokenizers, tok_name):
    tokenize = _ours(tokenizers[tok_name])
    for case in ("no_image", "one_image", "two_images", "spaces"):
        turns = CONVERSATIONS[case]
        assert pm.prompt_token_layout(pm.render(turns), tokenize) == \
            pm.prompt_token_layout(turns, tokenize)


def test_bos_offset_logic_like_upstream():
    # A toy tokenizer that adds BOS (7) to every chunk: upstream keeps one BOS
    # and drops the first id of each chunk.
    def tokenize(text):
        return [7] + [ord(c) for c in text]

    ids = pm.text_token_layout("ab<image>c<image>", tokenize, bos_token_id=7)
    assert ids == [7, 97, 98, pm.IMAGE_SLOT, 99, pm.IMAGE_SLOT]
    assert pm.text_token_layout("ab<image>c", tokenize) == [7, 97, 98, pm.IMAGE_SLOT, 7, 99]


def test_empty_chunks_produce_no_tokens():
    calls = []

    def tokenize(text):
        calls.append(text)
        return [len(text)]

    assert pm.text_token_layout("<image><image>x", tokenize) == [pm.IMAGE_SLOT, pm.IMAGE_SLOT, 1]
    assert calls == ["x"]


def test_build_segments_splices_features_in_order(tokenizers):
    tokenize = _ours(tokenizers["qwen2"])
    turns = CONVERSATIONS["multi_turn"]
    hidden = 8
    features = [np.full((family.IMAGE_TOKENS, hidden), i, np.float32) for i in range(3)]
    features[1] = ImageEmbeds(features[1])
    segments = pm.build_segments(turns, tokenize, features)
    layout = pm.prompt_token_layout(turns, tokenize)
    images = [s for s in segments if isinstance(s, ImageEmbeds)]
    assert [int(s.features[0, 0]) for s in images] == [0, 1, 2]
    assert all(s.features.dtype == np.float32 for s in images)
    assert all(isinstance(s, list) and s for s in segments if not isinstance(s, ImageEmbeds))
    text_ids = [t for s in segments if isinstance(s, list) for t in s]
    assert text_ids == [t for t in layout if t != pm.IMAGE_SLOT]
    assert segments_length(segments) == len(layout) - 3 + 3 * family.IMAGE_TOKENS
    # Images back to back ("<image>\n<image>\n"): a text run "\n" between them.
    kinds = ["img" if isinstance(s, ImageEmbeds) else "txt" for s in segments]
    assert kinds == ["txt", "img", "txt", "img", "txt", "img", "txt"]
    with pytest.raises(PromptError, match="3 image placeholders but 2 images"):
        pm.build_segments(turns, tokenize, features[:2])


# ---------------------------------------------------------- validation ----
BAD_TURNS = {
    "no_turns": ([], "no question"),
    "empty": ([pm.Turn("", 1)], "question is empty"),
    "whitespace": ([pm.Turn(" \n\t ", 1)], "question is empty"),
    "only_moderated": ([pm.Turn("<s></s>")], "question is empty"),
    "image_marker": ([pm.Turn("what is <image> here", 1)], "'<image>'"),
    "too_many_images": ([pm.Turn("a", 4, "b"), pm.Turn("c", 3)],
                        "7 images but the model takes at most 6"),
    "negative_images": ([pm.Turn("a", -1)], "cannot have -1 images"),
    "open_earlier_turn": ([pm.Turn("a", 0), pm.Turn("b", 0)], "earlier turn has no answer"),
    "answered_last_turn": ([pm.Turn("a", 0, "b")], "last turn already has an answer"),
}


@pytest.mark.parametrize("case", sorted(BAD_TURNS))
def test_bad_conversations_give_one_sentence(case):
    turns, expected = BAD_TURNS[case]
    with pytest.raises(PromptError) as info:
        pm.render(turns)
    message = str(info.value)
    assert expected in message and "\n" not in message and message.endswith(".")


def test_six_images_is_the_limit():
    assert family.MAX_IMAGES == 6
    pm.validate([pm.Turn("a", 3, "b"), pm.Turn("c", 3)])


def test_check_fits():
    pm.check_fits(3584, 512, 4096)                     # exactly full: fine
    with pytest.raises(PromptError) as info:
        pm.check_fits(3600, 512, 4096)
    message = str(info.value)
    assert "by 16 tokens" in message and "--max-tokens 496 or less" in message
    assert "fewer images" in message and message.endswith(".")
    with pytest.raises(PromptError) as info:
        pm.check_fits(5000, 512, 4096)
    assert "5000 tokens" in str(info.value) and "905 too many" in str(info.value)
    assert "fewer images" in str(info.value)


def test_question_that_is_not_utf8_is_refused():
    # what `huatuo-lite ask img.png $'\xff\xfe'` gives Python: lone surrogates (surrogateescape)
    question = b"\xff\xfe what?".decode("utf-8", "surrogateescape")
    with pytest.raises(PromptError, match="not valid UTF-8"):
        pm.validate([pm.Turn(question=question, n_images=1)])
    pm.validate([pm.Turn(question="这张胸部X光片显示了什么？", n_images=1)])   # real UTF-8 text passes
