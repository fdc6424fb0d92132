"""Qwen2.5-VL training examples and loss, checked against transformers' own processor and
model: the ids are the processor's (chat template, pads expanded per image), the labels
cover only the answers and their <|im_end|>, our pixels are the processor's, and our batch
loss (features spliced, 3-D positions, right padding) equals the model's own forward."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qwen_helpers import LAYOUTS, open_processor, user_message  # noqa: E402
from support.train_set import make_dataset  # noqa: E402

from huatuo_lite.convert.qwen25vl import train as qtrain  # noqa: E402
from huatuo_lite.convert.qwen25vl.checkpoint import open_qwen25vl  # noqa: E402
from huatuo_lite.convert.train.data import IGNORE, DataError  # noqa: E402
from huatuo_lite.convert.train.run import make_options  # noqa: E402
from huatuo_lite.families import qwen25vl as fam  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four records of two turns each (question + follow-up), one 96x96 image each."""
    return make_dataset(tmp_path_factory.mktemp("qwen-train-data"), follow_up=True)


def _messages(record: dict) -> list:
    turns = record["conversations"]
    out = []
    for i in range(0, len(turns), 2):
        out.append(user_message(len(record["image"]) if i == 0 else 0, turns[i]["value"]))
        out.append({"role": "assistant", "content": [{"type": "text", "text": turns[i + 1]["value"]}]})
    return out


def _runs(labels: list) -> list:
    """Contiguous runs of trained label ids."""
    runs, current = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ids_are_the_processors_and_labels_only_the_answers(layout, qwen_tiny_folders, dataset):
    from PIL import Image

    folder = qwen_tiny_folders[layout]
    ckpt = open_qwen25vl(folder)
    train_set, _, problems = qtrain.examples(dataset, ckpt, make_options("lora", {}))
    processor = open_processor(folder)
    records = json.loads(dataset.read_text())
    assert not problems and len(train_set) == len(records)        # one example per record
    for ex in train_set:
        record = records[ex.record_index]
        text = processor.apply_chat_template(_messages(record), tokenize=False)
        images = [Image.open(dataset.parent / name).convert("RGB") for name in record["image"]]
        expected = processor(text=[text], images=images, return_tensors="np")
        assert ex.input_ids == expected["input_ids"][0].tolist()
        answers = [t["value"] for t in record["conversations"][1::2]]
        decoded = [processor.tokenizer.decode(run) for run in _runs(ex.labels)]
        assert decoded == [a + fam.IM_END for a in answers]
        assert all(label in (IGNORE, token) for label, token in zip(ex.labels, ex.input_ids))
        # our pixels / grid are the processor's
        patches, thw = qtrain.image_patches(dataset.parent / record["image"][0],
                                            qtrain.ImageGrids(ckpt.image_pixels).fit)
        np.testing.assert_allclose(patches, expected["pixel_values"], atol=1e-6)
        assert list(thw) == expected["image_grid_thw"][0].tolist()
        assert ex.input_ids.count(ckpt.ids.image) == thw[1] * thw[2] // fam.MERGE_SIZE ** 2


def test_a_reply_with_a_turn_marker_is_a_bad_record(qwen_tiny_folders, dataset, tmp_path):
    records = json.loads(dataset.read_text())
    records[1]["conversations"][1]["value"] = "A blue<|im_end|> circle."
    records[2]["conversations"][0]["value"] = "What is <|image_pad|> this?"
    path = dataset.parent / "marked.json"
    path.write_text(json.dumps(records))
    ckpt = open_qwen25vl(qwen_tiny_folders["before-4.52"])
    with pytest.raises(DataError, match=r"^Record 1 of .*marked.json cannot be used: a reply contains '<\|im_end\|>'"):
        qtrain.examples(path, ckpt, make_options("lora", {}))
    train_set, _, problems = qtrain.examples(path, ckpt, make_options("lora", {"bad_records": "skip"}))
    assert [p.index for p in problems] == [1, 2] and "<|image_pad|>" in problems[1].reason
    assert sorted(ex.record_index for ex in train_set) == [0, 3]


@pytest.mark.parametrize("merger_trains", [False, True])
def test_batch_loss_equals_the_models_own_forward(merger_trains, qwen_tiny_folders, dataset):
    """A right-padded batch of two (different lengths) vs transformers' forward on each
    example alone (input_ids + pixel_values + image_grid_thw, its own get_rope_index)."""
    folder = qwen_tiny_folders["from-4.52"]
    ckpt = open_qwen25vl(folder)
    train_set, _, _ = qtrain.examples(dataset, ckpt, make_options("lora", {}))
    batch = [train_set[0], train_set[3]]
    assert len(batch[0].input_ids) != len(batch[1].input_ids)
    model = qtrain.build_model(ckpt)
    feed = qtrain.VisionFeed(model, ckpt.image_pixels, 0, merger_trains)
    with torch.no_grad():
        loss, n = qtrain.batch_loss(model, batch, feed, ckpt.ids.image)
        total, count = 0.0, 0
        for ex in batch:
            patches, thw = qtrain.image_patches(ex.images[0], feed.fit)
            logits = model(input_ids=torch.tensor([ex.input_ids]), pixel_values=torch.from_numpy(patches),
                           image_grid_thw=torch.tensor([thw])).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            keep = labels != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    assert n == count
    assert abs(float(loss) - total / count) < 1e-4 * max(1.0, total / count)
