"""The tiny Qwen2.5-VL checkpoint loads in transformers 4.57 in both tensor layouts, our
reader sees the same facts and tensors in both, and a broken folder is one sentence."""
from __future__ import annotations

import json
import shutil

import pytest
from qwen_helpers import LAYOUTS

from huatuo_lite.errors import HuatuoError, ModelFormatError
from huatuo_lite.families import qwen25vl as fam


def test_transformers_loads_every_tensor(qwen_tiny):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_tiny), dtype=torch.float32,
                                                                     output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    config = json.loads((qwen_tiny / "config.json").read_text())
    assert model.config.vision_config.fullatt_block_indexes == config["vision_config"]["fullatt_block_indexes"]
    assert model.config.text_config.rope_scaling["mrope_section"] == [16, 24, 24]


def test_layouts_differ_only_in_names(qwen_tiny_folders):
    before, after = (qwen_tiny_folders[layout] for layout in LAYOUTS)
    names = {layout: set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
             for layout, folder in qwen_tiny_folders.items()}
    assert any(n.startswith("visual.") for n in names["before-4.52"])
    assert all(n.startswith(("model.visual.", "model.language_model.", "lm_head.")) for n in names["from-4.52"])
    assert "text_config" in json.loads((after / "config.json").read_text())
    assert "text_config" not in json.loads((before / "config.json").read_text())
    assert (before / "chat_template.json").is_file() and (after / "chat_template.jinja").is_file()


def test_reader_gives_the_same_facts_and_tensors_for_both_layouts(qwen_tiny_folders):
    import torch

    from huatuo_lite.convert.qwen25vl.checkpoint import is_qwen25vl, open_qwen25vl
    from huatuo_lite.convert.qwen25vl.tiny import CHAT_TEMPLATE

    before, after = (open_qwen25vl(qwen_tiny_folders[layout]) for layout in LAYOUTS)
    assert (before.layout, after.layout) == LAYOUTS
    config = json.loads((qwen_tiny_folders["before-4.52"] / "config.json").read_text())
    for ckpt in (before, after):
        assert ckpt.text.hidden_size == config["hidden_size"] and ckpt.text.mrope_section == (16, 24, 24)
        assert ckpt.vision.fullatt_block_indexes == tuple(config["vision_config"]["fullatt_block_indexes"])
        assert ckpt.vision.out_hidden_size == config["hidden_size"]
        assert ckpt.image_pixels == (3136, 12845056)          # Qwen2.5-VL-7B-Instruct's preprocessor_config
        assert (ckpt.generation.temperature, ckpt.generation.top_p, ckpt.generation.top_k,
                ckpt.generation.repetition_penalty) == (0.1, 0.001, 1, 1.05)
        assert ckpt.chat_template == CHAT_TEMPLATE
        assert ckpt.ids.image == config["image_token_id"]
        assert is_qwen25vl(ckpt.root)
    tok = json.loads((qwen_tiny_folders["before-4.52"] / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert before.eos_token_ids == after.eos_token_ids == {added["<|im_end|>"], added["<|endoftext|>"]}
    assert before.names() == after.names() and "visual.merger.mlp.2.weight" in before.names()
    for (name_a, a), (name_b, b) in zip(before.iter_tensors(), after.iter_tensors()):
        assert name_a == name_b and torch.equal(a, b)


def test_only_qwen25vl_configs_are_recognised():
    from huatuo_lite.convert.qwen25vl.checkpoint import declares_qwen25vl

    assert declares_qwen25vl({"architectures": [fam.VARIANT.architecture]})
    assert declares_qwen25vl({"model_type": "qwen2_5_vl"})
    assert not declares_qwen25vl({"architectures": ["LlavaQwen2ForCausalLM"], "model_type": "qwen2_5_vl"})


def test_cli_convert_tiny_variant(tmp_path):
    from click.testing import CliRunner

    from huatuo_lite.cli.main import cli
    from huatuo_lite.convert.qwen25vl.checkpoint import open_qwen25vl

    result = CliRunner().invoke(cli, ["convert", "tiny", str(tmp_path / "t"), "--variant", fam.VARIANT.name])
    assert result.exit_code == 0, result.output
    assert open_qwen25vl(tmp_path / "t").layout == "before-4.52"


# ------------------------------------------------------------------ bad input ----
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _drop_shard(root):
    (root / "model-00002-of-00003.safetensors").unlink()


def _rename_tensor(root):
    from safetensors.torch import load_file, save_file

    shard = root / "model-00001-of-00003.safetensors"
    tensors = load_file(str(shard))
    old = next(n for n in tensors if n.endswith("attn.qkv.weight"))
    tensors[old.replace("attn.qkv", "attn.qkv_renamed")] = tensors.pop(old)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _edit_json(root / "model.safetensors.index.json",
               lambda d: d["weight_map"].__setitem__(old.replace("attn.qkv", "attn.qkv_renamed"),
                                                     d["weight_map"].pop(old)))


def _no_vision_depth(root):
    _edit_json(root / "config.json", lambda d: d["vision_config"].pop("depth"))


def _no_mrope(root):
    _edit_json(root / "config.json", lambda d: d["rope_scaling"].pop("mrope_section"))


def _wrong_depth(root):
    _edit_json(root / "config.json", lambda d: d["vision_config"].__setitem__("depth", 3))


def _patch_size(root):
    _edit_json(root / "config.json", lambda d: d["vision_config"].__setitem__("patch_size", 16))


def _narrower_mlp(root):
    _edit_json(root / "config.json", lambda d: d["vision_config"].__setitem__(
        "intermediate_size", d["vision_config"]["intermediate_size"] // 2))


def _no_tokenizer(root):
    for name in ("tokenizer.json", "vocab.json"):
        (root / name).unlink()


def _no_preprocessor(root):
    (root / "preprocessor_config.json").unlink()


def _bad_pixels(root):
    _edit_json(root / "preprocessor_config.json", lambda d: d.__setitem__("min_pixels", "many"))


BROKEN = {  # how the folder is broken -> (what to do to it, words the sentence must hold)
    "missing shard": (_drop_shard, "model-00002-of-00003.safetensors listed in"),
    "renamed tensor": (_rename_tensor, "is missing the tensor visual.blocks.0.attn.qkv.weight"),
    "config without vision depth": (_no_vision_depth, "has no 'depth'"),
    "config without mrope_section": (_no_mrope, "has no 'mrope_section'"),
    "config with fewer layers than the weights": (_wrong_depth, "which its config.json's model does not have"),
    "other patch size": (_patch_size, "sets patch_size 16"),
    "config with another vision mlp width": (_narrower_mlp, "visual.blocks.0.mlp.gate_proj.weight has shape"),
    "no tokenizer": (_no_tokenizer, "has no tokenizer"),
    "no preprocessor_config.json": (_no_preprocessor, "has no preprocessor_config.json"),
    "bad min_pixels": (_bad_pixels, "min_pixels 'many'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_is_one_sentence(case, qwen_tiny_folders, tmp_path):
    from huatuo_lite.convert.qwen25vl.checkpoint import open_qwen25vl

    root = _copy(qwen_tiny_folders["before-4.52"], tmp_path / "broken")
    breaks, words = BROKEN[case]
    breaks(root)
    with pytest.raises(ModelFormatError) as err:
        open_qwen25vl(root)
    message = str(err.value)
    assert words in message and str(root) in message
    assert "\n" not in message and message.endswith(".") and message.count(". ") <= 1


def test_tensor_of_another_layout_is_one_sentence(qwen_tiny_folders, tmp_path):
    """A from-4.52 folder with one tensor under its pre-4.52 name: the names do not fit one layout."""
    from safetensors.torch import load_file, save_file

    from huatuo_lite.convert.qwen25vl.checkpoint import open_qwen25vl

    root = _copy(qwen_tiny_folders["from-4.52"], tmp_path / "mixed")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    shard_name = index["weight_map"]["lm_head.weight"]
    tensors = load_file(str(root / shard_name))
    tensors["model.norm.weight"] = tensors.pop("model.language_model.norm.weight")
    save_file(tensors, str(root / shard_name), metadata={"format": "pt"})
    index["weight_map"]["model.norm.weight"] = index["weight_map"].pop("model.language_model.norm.weight")
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match=r"holds the tensor model\.norm\.weight, which is not named like"):
        open_qwen25vl(root)


def test_llava_config_is_refused_by_the_qwen_reader(qwen_tiny_folders, tmp_path):
    from huatuo_lite.convert.qwen25vl.checkpoint import is_qwen25vl, open_qwen25vl

    root = _copy(qwen_tiny_folders["before-4.52"], tmp_path / "llava")
    _edit_json(root / "config.json", lambda d: d.update(architectures=["LlavaQwen2ForCausalLM"],
                                                         model_type="llava_qwen2"))
    assert not is_qwen25vl(root)
    with pytest.raises(ModelFormatError, match="not Qwen2_5_VLForConditionalGeneration"):
        open_qwen25vl(root)


def test_tiny_maker_refuses_bad_arguments(tmp_path):
    from huatuo_lite.convert.qwen25vl.tiny import make_tiny_qwen25vl

    with pytest.raises(HuatuoError, match="Unknown Qwen2.5-VL tensor layout 'newest'"):
        make_tiny_qwen25vl(tmp_path / "a", layout="newest")
    with pytest.raises(HuatuoError, match="hidden_size / num_heads must be 128"):
        make_tiny_qwen25vl(tmp_path / "b", num_heads=4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
