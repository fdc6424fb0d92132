"""Small, real tokenizers in the upstream formats, trained on a fixed corpus.

- Qwen2 (7B): byte-level BPE with Qwen2's Split regex + ByteLevel pre-tokenizer,
  NFC normalizer, and the three Qwen2 special tokens right after the normal
  vocabulary, saved as tokenizer.json + vocab.json + merges.txt +
  tokenizer_config.json (Qwen2Tokenizer).
- Yi (34B): a SentencePiece BPE model with byte fallback, <unk>=0,
  <|startoftext|>=1, <|endoftext|>=2, saved as tokenizer.model (LlamaTokenizer)
  plus a tokenizer.json converted by transformers (LlamaTokenizerFast).

Training is deterministic: same corpus, same settings, same files.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from huatuo_lite.families.llava import CONTEXT_LENGTH

# Qwen2's pre-tokenizer regex (tokenizer.json of Qwen/Qwen2-7B, "Split" step).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_VOCAB_TARGET = 1500     # normal tokens before the specials (upstream: 151643)
YI_SPECIALS = ("<unk>", "<|startoftext|>", "<|endoftext|>")   # ids 0, 1, 2
YI_VOCAB_TARGET = 1024

# A fixed English + Chinese medical-ish corpus, with the upstream prompt tags so
# that they tokenize into a few pieces, as they do with the real vocabularies.
_SENTENCES = (
    "<|user|>\n<image>\nWhat abnormality is seen in this chest X-ray?\n<|assistant|>\n"
    "The chest radiograph shows a right lower lobe consolidation consistent with pneumonia. \n",
    "<|user|>\n<image>\n<image>\nCompare the two CT scans of the abdomen.\n<|assistant|>\n"
    "The second scan shows a smaller hepatic lesion after treatment.",
    "<|user|>\n<image>\n这张胸部X光片显示了什么异常？\n<|assistant|>\n右下肺叶实变，符合肺炎表现。",
    "<|user|>\n<image>\n请描述这张腹部CT图像。\n<|assistant|>\n肝脏内可见低密度病灶，边界清晰，考虑囊肿。",
    "Question: Is there evidence of a fracture in the left femur?\nA. Yes\nB. No\n"
    "Answer with the option's letter from the given choices directly.",
    "MRI of the brain demonstrates a hyperintense lesion in the left temporal lobe on T2-weighted images.",
    "磁共振成像显示左侧颞叶T2加权像高信号病变，建议进一步检查。",
    "The histopathology slide shows atypical cells with enlarged nuclei and frequent mitoses.",
    "病理切片可见异型细胞，细胞核增大，核分裂象多见，提示恶性肿瘤。",
    "Ultrasound of the thyroid reveals a 12 mm hypoechoic nodule with irregular margins.",
    "甲状腺超声提示低回声结节，大小约12毫米，边缘不规则。",
    "The patient is a 65-year-old man with hypertension, diabetes and chronic kidney disease.",
    "患者男性，65岁，有高血压、糖尿病和慢性肾病病史。",
    "Echocardiography shows reduced left ventricular ejection fraction of 35 percent.",
    "心脏超声显示左心室射血分数降低至百分之三十五。",
    "Dermoscopy image: an asymmetric pigmented lesion with multiple colours, suspicious for melanoma.",
    "皮肤镜图像：不对称的色素性病变，颜色多样，怀疑黑色素瘤。",
    "Fundus photograph shows microaneurysms and hard exudates, consistent with diabetic retinopathy.",
    "眼底照片显示微动脉瘤和硬性渗出，符合糖尿病视网膜病变。",
    "Mammography: a spiculated mass in the upper outer quadrant of the right breast, BI-RADS 5.",
    "乳腺钼靶：右乳外上象限可见毛刺状肿块，BI-RADS 5类。",
    "Endoscopy reveals an ulcer in the gastric antrum; biopsy was taken to exclude malignancy.",
    "胃镜检查发现胃窦部溃疡，已取活检以排除恶性病变。",
    "No acute intracranial hemorrhage, mass effect or midline shift is identified.",
    "未见急性颅内出血、占位效应或中线移位。",
    "Findings: bilateral pleural effusions, cardiomegaly, and pulmonary edema.",
    "影像所见：双侧胸腔积液，心脏增大，肺水肿。",
    "Impression: findings are most consistent with congestive heart failure.",
    "诊断意见：上述表现最符合充血性心力衰竭。",
    "Which organ is shown in this image? The liver, the spleen, the kidney or the pancreas?",
    "图中显示的是哪个器官？肝脏、脾脏、肾脏还是胰腺？",
    "Medication: metformin 500 mg twice daily, lisinopril 10 mg once daily, aspirin 100 mg.",
    "用药：二甲双胍500毫克每日两次，赖诺普利10毫克每日一次，阿司匹林100毫克。",
    "Blood pressure 150/95 mmHg, heart rate 88 bpm, temperature 37.8 C, SpO2 96%.",
    "血压150/95毫米汞柱，心率每分钟88次，体温37.8度，血氧饱和度96%。",
    "This is for research use only and is not medical advice; consult a qualified doctor.",
    "本模型仅供研究使用，不构成医疗建议，请咨询专业医生。",
)
CORPUS = "\n".join(_SENTENCES)


@dataclass(frozen=True)
class TokenizerInfo:
    """What the config writer needs to know about a tokenizer it just saved."""

    size: int                 # number of token ids, specials and added tokens included
    special_ids: dict         # token text -> id


def _corpus_lines(repeat: int = 3) -> list:
    # Repetition gives the trainers frequencies to rank merges by; content is fixed.
    return [line for _ in range(repeat) for line in CORPUS.splitlines() if line]


def _dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_token_entry(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": special}


# ------------------------------------------------------------------ Qwen2 ----
def _qwen2_bpe():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def build_qwen2_tokenizer(out_dir, extra_tokens=(), vocab_target=QWEN2_VOCAB_TARGET) -> TokenizerInfo:
    """Train and save a Qwen2-format tokenizer into out_dir.

    extra_tokens (e.g. ("<image>",) for the -hf layout) are added as special
    tokens after Qwen2's three, like the -hf conversion did (id 151646 there).
    """
    from tokenizers import AddedToken, trainers, pre_tokenizers

    out_dir = Path(out_dir)
    tok = _qwen2_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_target, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    added = list(QWEN2_SPECIALS) + list(extra_tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))                       # vocab.json + merges.txt
    ids = {t: tok.token_to_id(t) for t in added}
    _dump_json(out_dir / "tokenizer_config.json", _qwen2_tokenizer_config(ids))
    _dump_json(out_dir / "special_tokens_map.json", _qwen2_special_map(extra_tokens))
    return TokenizerInfo(size=tok.get_vocab_size(with_added_tokens=True), special_ids=ids)


def _qwen2_tokenizer_config(ids: dict) -> dict:
    eos = QWEN2_SPECIALS[0]
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added_token_entry(t) for t, i in ids.items()},
        "additional_special_tokens": [t for t in ids if t != eos],
        "bos_token": None,
        "chat_template": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": CONTEXT_LENGTH,
        "pad_token": eos,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _qwen2_special_map(extra_tokens) -> dict:
    eos = QWEN2_SPECIALS[0]
    return {"additional_special_tokens": list(QWEN2_SPECIALS[1:]) + list(extra_tokens),
            "eos_token": eos, "pad_token": eos}


# --------------------------------------------------------------------- Yi ----
def _train_sentencepiece(vocab_target: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()), model_writer=model,
        model_type="bpe", vocab_size=vocab_target, hard_vocab_limit=False,
        byte_fallback=True, split_digits=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece=YI_SPECIALS[0], bos_piece=YI_SPECIALS[1], eos_piece=YI_SPECIALS[2],
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"], num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def build_yi_tokenizer(out_dir, vocab_target=YI_VOCAB_TARGET) -> TokenizerInfo:
    """Train and save a Yi-format SentencePiece tokenizer (slow + converted fast)."""
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    out_dir = Path(out_dir)
    (out_dir / "tokenizer.model").write_bytes(_train_sentencepiece(vocab_target))
    unk, bos, eos = YI_SPECIALS
    _dump_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_eos_token": False,
        # The model has no dummy prefix; this keeps the converted fast tokenizer
        # from prepending "▁" so that slow and fast give the same ids.
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _added_token_entry(t) for i, t in enumerate(YI_SPECIALS)},
        "bos_token": bos,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "legacy": True,
        "model_max_length": CONTEXT_LENGTH,
        "pad_token": unk,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": unk,
        "use_default_system_prompt": False,
    })
    _dump_json(out_dir / "special_tokens_map.json",
               {"bos_token": bos, "eos_token": eos, "pad_token": unk, "unk_token": unk})
    slow = LlamaTokenizer.from_pretrained(str(out_dir))
    fast = convert_slow_tokenizer(slow)
    _check_same_ids(slow, fast)
    fast.save(str(out_dir / "tokenizer.json"))
    return TokenizerInfo(size=len(slow), special_ids={t: i for i, t in enumerate(YI_SPECIALS)})



# Strings where SentencePiece and its tokenizers conversion have diverged before:
# leading/double spaces, digits, byte fallback, special-token text, CJK.
_CHECK_TEXTS = (" leading space", "two  spaces\n\nand lines", "12345 mm", "émoji 🩺 ✓",
                "<|endoftext|> after", "<|user|>\n<image>\n胸部X光片？\n<|assistant|>\n")


def _check_same_ids(slow, fast) -> None:
    """The runtime uses tokenizer.json (tokenizers), transformers may use the slow
    SentencePiece tokenizer: they must agree id for id."""
    for text in _CHECK_TEXTS + tuple(_corpus_lines(repeat=1)):
        want = slow(text, add_special_tokens=False).input_ids
        got = fast.encode(text, add_special_tokens=False).ids
        if got != want:
            raise RuntimeError(f"Converted Yi tokenizer.json disagrees with tokenizer.model on {text!r}: "
                               f"{got} != {want}.")
