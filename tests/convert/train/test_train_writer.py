"""The upstream-layout checkpoint writer (every variant), and what each training mode
sets up: which modules train, which are LoRA-wrapped, which are quantized."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("variant", ["tiny_7b", "tiny_34b", "tiny_7b_hf"])
def test_writer_reproduces_the_source_layout(variant, request, tmp_path):
    from safetensors import safe_open

    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.checkpoint.writer import stored_names, write_checkpoint

    src = request.getfixturevalue(variant)
    ckpt = open_checkpoint(src)
    tensors = {name: ckpt.get(name).float() for name in ckpt.names()}   # as a trained float32 model holds them
    out = write_checkpoint(ckpt, tensors, tmp_path / "out", max_shard_bytes=2 * 1024 ** 2)
    again = open_checkpoint(out)
    assert again.variant == ckpt.variant and sorted(again.names()) == sorted(ckpt.names())
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == sorted(stored_names(ckpt).values())        # the source's own names
    shards = sorted(set(index.values()))
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    with safe_open(str(out / shards[0]), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    for name in ckpt.names():
        assert torch.equal(again.get(name), ckpt.get(name)), name
    copied = {p.name for p in src.iterdir()} - {p.name for p in src.glob("*.safetensors*")}
    assert copied <= {p.name for p in out.iterdir()}                   # tokenizer, vit/, generation_config...
    # a second write with other shard sizes leaves no stale shard behind
    write_checkpoint(ckpt, tensors, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]


def test_writer_refuses_missing_or_misshapen_tensors(tiny_7b, tmp_path):
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.checkpoint.writer import write_checkpoint
    from huatuo_lite.errors import ModelFormatError

    ckpt = open_checkpoint(tiny_7b)
    tensors = {name: ckpt.get(name) for name in ckpt.names()}
    with pytest.raises(ModelFormatError, match="lacks the tensor lm_head.weight"):
        write_checkpoint(ckpt, {k: v for k, v in tensors.items() if k != "lm_head.weight"}, tmp_path / "a")
    tensors["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ModelFormatError, match="model.norm.weight has shape"):
        write_checkpoint(ckpt, tensors, tmp_path / "b")
    assert not (tmp_path / "b" / "config.json").exists()
    with pytest.raises(ModelFormatError, match="overwrite the source"):
        write_checkpoint(ckpt, {name: ckpt.get(name) for name in ckpt.names()}, tiny_7b)


def _trainable(model) -> set:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_modes_train_what_they_should(tiny_7b):
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.train.model import LoraOptions, build_trainable

    ckpt = open_checkpoint(tiny_7b)
    align, _ = build_trainable(ckpt, "align")
    assert _trainable(align) and all(".multi_modal_projector." in n for n in _trainable(align))
    full, _ = build_trainable(ckpt, "full")
    assert _trainable(full) == {n for n, _ in full.named_parameters()}
    lora, llava = build_trainable(ckpt, "lora", LoraOptions(r=4, train_projector=False))
    assert _trainable(lora) and all("lora_" in n and ".language_model.layers." in n for n in _trainable(lora))
    wrapped = {n.rsplit(".", 1)[0] for n in _trainable(lora)}
    assert not any("vision_tower" in n for n in wrapped)                 # CLIP's q/k/v stay plain
    assert len({n.split(".lora_")[0] for n in wrapped}) == ckpt.text.num_layers * 7


def test_qlora_quantizes_only_the_language_model(tiny_7b):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.train.model import build_trainable

    ckpt = open_checkpoint(tiny_7b)
    _, llava = build_trainable(ckpt, "qlora")
    quantized = {n for n, m in llava.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == ckpt.text.num_layers * 7
    assert all(n.startswith("model.language_model.layers.") for n in quantized)
    plain = [llava.lm_head, llava.model.multi_modal_projector.modules_to_save["default"].linear_1,
             llava.model.vision_tower.vision_model.encoder.layers[0].self_attn.q_proj]
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in plain)


def test_unknown_mode_and_option_are_one_sentence(tiny_7b, tmp_path):
    from huatuo_lite.convert.train.run import train
    from huatuo_lite.errors import HuatuoError

    with pytest.raises(HuatuoError, match="Unknown training option 'learning_rate'"):
        train("x.json", tiny_7b, tmp_path, mode="lora", learning_rate=1.0)
    with pytest.raises(HuatuoError, match="Unknown training mode 'dpo'"):
        train("x.json", tiny_7b, tmp_path, mode="dpo")
    with pytest.raises(HuatuoError, match="Unknown schedule 'exp'"):
        train("x.json", tiny_7b, tmp_path, mode="lora", schedule="exp")


def test_qlora_without_bitsandbytes_suggests_lora(tiny_7b, monkeypatch):
    import sys

    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.train.model import build_trainable
    from huatuo_lite.errors import HuatuoError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)     # import fails as if not installed
    with pytest.raises(HuatuoError, match=r"cannot run here .*; use --mode lora instead\.$"):
        build_trainable(open_checkpoint(tiny_7b), "qlora")


def test_gradient_checkpointing_gives_the_same_losses(tiny_7b, tmp_path):
    from support.train_set import make_dataset

    from huatuo_lite.convert.train.run import train

    data = make_dataset(tmp_path / "data", follow_up=False)
    runs = [train(data, tiny_7b, tmp_path / f"out{gc}", mode="lora", max_steps=2, lora_r=4, lora_dropout=0.0,
                  gradient_checkpointing=gc, progress=False, device="cpu").losses for gc in (False, True)]
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.train.model import build_trainable

    _, llava = build_trainable(open_checkpoint(tiny_7b), "lora", gradient_checkpointing=True)
    assert all(layer.gradient_checkpointing for layer in llava.model.language_model.layers)


def test_padded_batch_loss_is_the_token_weighted_mean_of_single_losses(tiny_7b, tmp_path):
    """Right padding, several images per batch and per example: each example's image
    features land at its own placeholder, padding never counts."""
    from support.train_set import make_dataset
    from transformers import AutoTokenizer

    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.train.run import ImageFeed
    from huatuo_lite.convert.train.data import build_examples, read_records
    from huatuo_lite.convert.train.model import batch_loss, build_trainable

    data = make_dataset(tmp_path / "data", follow_up=True)
    records = read_records(data)
    records[1]["image"] = [records[1]["image"][0], records[2]["image"][0]]      # two images in one record
    tok = AutoTokenizer.from_pretrained(str(tiny_7b))
    examples, _ = build_examples(records[:2], lambda t: tok(t, add_special_tokens=False).input_ids, 1500,
                                 data.parent)
    batch = [examples[1], examples[2], examples[0]]            # lengths differ; 1 + 2 + 1 images
    assert [len(e.images) for e in batch] == [1, 2, 1] and len({len(e.input_ids) for e in batch}) == 3
    ckpt = open_checkpoint(tiny_7b)
    _, llava = build_trainable(ckpt, "full")
    feed = ImageFeed(llava, ckpt.vision.select_layer, cache_size=0)
    with torch.no_grad():
        together, n = batch_loss(llava, batch, feed([p for e in batch for p in e.images]))
        singles = [batch_loss(llava, [e], feed(e.images)) for e in batch]
    assert n == sum(k for _, k in singles)
    expected = sum(float(loss) * k for loss, k in singles) / n
    assert float(together) == pytest.approx(expected, rel=1e-5)
    swapped = [examples[2], examples[1], examples[0]]           # features follow their own example
    with torch.no_grad():
        wrong, _ = batch_loss(llava, swapped, feed([p for e in batch for p in e.images]))
    assert float(wrong) != pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("variant,mode", [("tiny_34b", "full"), ("tiny_7b_hf", "lora")])
def test_other_variants_train_and_come_back_in_their_own_layout(variant, mode, request, tmp_path):
    """Yi (SentencePiece, llama) and the -hf layout: trained output keeps the source's names."""
    from support.train_set import make_dataset

    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.checkpoint.writer import stored_names
    from huatuo_lite.convert.train.merge import merge
    from huatuo_lite.convert.train.run import train

    src = request.getfixturevalue(variant)
    data = make_dataset(tmp_path / "data", follow_up=False)
    result = train(data, src, tmp_path / "out", mode=mode, max_steps=2, lora_r=4, lr=1e-3, progress=False,
                   device="cpu")
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    folder = result.model_dir or merge(result.adapter_dir, src, tmp_path / "merged")
    source, trained = open_checkpoint(src), open_checkpoint(folder)
    assert trained.variant == source.variant
    assert sorted(stored_names(trained).values()) == sorted(stored_names(source).values())
    changed = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(trained.get(changed), source.get(changed))


def test_a_trained_folder_used_as_source_does_not_carry_its_training_files(tiny_7b, tmp_path):
    import shutil

    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.checkpoint.writer import write_checkpoint

    src = tmp_path / "trained"
    shutil.copytree(tiny_7b, src)
    (src / "checkpoints" / "step-000001").mkdir(parents=True)
    (src / "train_log.json").write_text("{}")
    ckpt = open_checkpoint(src)
    out = write_checkpoint(ckpt, {n: ckpt.get(n) for n in ckpt.names()}, tmp_path / "out")
    assert not (out / "checkpoints").exists() and not (out / "train_log.json").exists()
    assert (out / "tokenizer.json").is_file()
