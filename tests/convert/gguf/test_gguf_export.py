"""GGUF files as written: readable by the gguf package with the keys llama.cpp needs,
the manifest, the llama.cpp image-graph defect, and one-sentence errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from support.engines import open_gguf, random_pixels, skip_without
skip_without('torch', 'gguf', 'llama_cpp')



def _reader(path):
    from gguf import GGUFReader

    return GGUFReader(path)


def _value(reader, key):
    field = reader.fields[key]
    return field.contents()


def _only(folder, role):
    manifest = json.loads((folder / "manifest.json").read_text())
    names = [n for n, e in manifest["files"].items() if e["role"] == role]
    assert len(names) == 1, manifest["files"]
    return folder / names[0]


TEXT_EXPECTED = {
    "gguf_7b_f32": {"general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"},
    "gguf_34b_f32": {"general.architecture": "llama", "tokenizer.ggml.model": "llama"},
}


@pytest.mark.parametrize("name", sorted(TEXT_EXPECTED))
def test_text_gguf_keys(name, request):
    from huatuo_lite.convert.gguf.text import chat_template
    from huatuo_lite.convert.checkpoint.read import open_checkpoint

    folder = request.getfixturevalue(name)
    ckpt = open_checkpoint(request.getfixturevalue({"gguf_7b_f32": "tiny_7b", "gguf_34b_f32": "tiny_34b"}[name]))
    reader = _reader(_only(folder, "text"))
    for key, value in TEXT_EXPECTED[name].items():
        assert _value(reader, key) == value, key
    arch, text = TEXT_EXPECTED[name]["general.architecture"], ckpt.text
    assert _value(reader, f"{arch}.embedding_length") == text.hidden_size
    assert _value(reader, f"{arch}.block_count") == text.num_layers
    assert _value(reader, f"{arch}.attention.head_count_kv") == text.num_kv_heads
    assert _value(reader, f"{arch}.rope.freq_base") == pytest.approx(text.rope_theta)
    tokens = _value(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == text.vocab_size
    if arch == "qwen2":   # Qwen2 has embedding rows past the tokenizer (152064 vs 151646)
        assert tokens[-1] == f"[PAD{text.vocab_size - 1}]"
    assert _value(reader, "tokenizer.ggml.add_bos_token") is False
    assert _value(reader, "tokenizer.ggml.eos_token_id") == text.eos_token_id
    assert _value(reader, "tokenizer.chat_template") == chat_template()
    assert ("tokenizer.ggml.merges" in reader.fields) == (arch == "qwen2")
    assert ("tokenizer.ggml.scores" in reader.fields) == (arch == "llama")
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight"} <= names
    assert ("blk.0.attn_q.bias" in names) == text.attention_bias


def test_mmproj_keys(gguf_7b_f32, tiny_7b):
    from huatuo_lite.convert.checkpoint.read import open_checkpoint

    vision = open_checkpoint(tiny_7b).vision
    reader = _reader(_only(gguf_7b_f32, "mmproj"))
    keep = vision.num_layers - 1     # hidden_states[-2]
    expected = {"general.architecture": "clip", "general.type": "mmproj", "clip.projector_type": "mlp",
                "clip.has_vision_encoder": True, "clip.use_gelu": False, "clip.vision.block_count": keep,
                "clip.vision.feature_layer": [keep], "clip.vision.image_size": vision.image_size,
                "clip.vision.patch_size": vision.patch_size, "clip.vision.projection_dim": 256}
    for key, value in expected.items():
        assert _value(reader, key) == value, key
    assert "clip.vision.image_grid_pinpoints" not in reader.fields
    names = {t.name for t in reader.tensors}
    assert {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "mm.0.weight",
            "mm.2.bias", f"v.blk.{keep - 1}.ffn_down.weight"} <= names
    assert not any(n.startswith(("v.post_ln", f"v.blk.{keep}.")) for n in names)


def test_manifest_and_folder_contents(gguf_7b_f32, tiny_7b):
    from huatuo_lite.fsutil import sha256_file

    manifest = json.loads((gguf_7b_f32 / "manifest.json").read_text())
    on_disk = sorted(p.name for p in gguf_7b_f32.iterdir())
    # nothing else, no leftovers; the Modelfile and model card are documents, not model files
    assert on_disk == sorted([*manifest["files"], "manifest.json", "Modelfile", "README.md"])
    roles = sorted(e["role"] for e in manifest["files"].values())
    assert roles == ["mmproj", "text", "vision"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(gguf_7b_f32 / name) and entry["size"] == (gguf_7b_f32 / name).stat().st_size
    assert _only(gguf_7b_f32, "text").name == f"{manifest['name']}-F32.gguf"
    assert _only(gguf_7b_f32, "mmproj").name == f"mmproj-{manifest['name']}-F16.gguf"
    assert manifest["text"]["n_embd"] == 256 and manifest["vision"]["mmproj_projector"] == "mlp"
    assert manifest["source"]["config_sha256"] == sha256_file(tiny_7b / "config.json")
    assert manifest["tools"]["llama-cpp-python"] and manifest["tools"]["gguf"]


def test_quantized_files_have_their_types(gguf_7b_q4_k_m, gguf_7b_q8_0):
    from gguf import GGMLQuantizationType as Q

    types = {t.name: t.tensor_type for t in _reader(_only(gguf_7b_q4_k_m, "text")).tensors}
    assert {Q.Q4_K, Q.Q6_K} & set(types.values()) and types["output_norm.weight"] == Q.F32
    assert not any(p.name.endswith(".intermediate") for p in gguf_7b_q4_k_m.iterdir())
    q8 = {t.name: t.tensor_type for t in _reader(_only(gguf_7b_q8_0, "text")).tensors}
    assert q8["blk.0.ffn_up.weight"] == Q.Q8_0
    mm = {t.name: t.tensor_type for t in _reader(_only(gguf_7b_q8_0, "mmproj")).tensors}
    assert mm["mm.0.weight"] == Q.Q8_0 and mm["v.position_embd.weight"] == Q.F32


# ------------------------------------------------------ llama.cpp defect ----
def _defective_llava_features(torch_engine, pixels):
    """What vendored llama.cpp's LLaVA graph computes: CLS appended after the
    patches, positions added in that order, rows 1..N kept (first patch dropped,
    CLS output kept), then the projector."""
    import torch

    llava = torch_engine.model.model
    vt = llava.vision_tower.vision_model
    keep = len(vt.encoder.layers) + 1 + torch_engine.checkpoint.vision.select_layer
    with torch.inference_mode():
        x = torch.from_numpy(pixels)
        patches = vt.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)        # [N, 576, D]
        cls = vt.embeddings.class_embedding.expand(len(x), 1, -1)                      # [N, 1, D]
        h = vt.pre_layrnorm(torch.cat([patches, cls], 1) + vt.embeddings.position_embedding.weight[None])
        for layer in vt.encoder.layers[:keep]:
            out = layer(h, None, None)
            h = out[0] if isinstance(out, tuple) else out
        return llava.multi_modal_projector(h[:, 1:]).numpy()


def test_libmtmd_llava_defect_is_present(gguf_7b_f32, torch_7b):
    """Fails the day llama.cpp fixes its LLaVA class-token order: then switch the
    backend to libmtmd (the manifest self-test already does so by itself)."""
    from huatuo_lite.backends.gguf_mtmd import MtmdEncoder, mtmd_self_test, token_cosines

    engine = open_gguf(gguf_7b_f32)
    try:
        pixels = random_pixels(1)
        mtmd = MtmdEncoder(engine.mmproj_path, engine._model, engine.hidden_size, threads=1)
        features = mtmd.encode(pixels)
        mtmd.close()
    finally:
        engine.close()
    reference = torch_7b.encode_images(pixels)
    cos = token_cosines(features, reference)
    defect = token_cosines(features, _defective_llava_features(torch_7b, pixels))
    print(f"libmtmd vs reference: per-token cosine min {cos.min():.4f} mean {cos.mean():.4f}; "
          f"vs the defect simulated in torch: min {defect.min():.6f}")
    assert defect.min() > 0.9999          # our mmproj is right; llama.cpp's graph is what differs
    assert cos.min() < 0.9                # the defect is still there
    recorded = json.loads((gguf_7b_f32 / "manifest.json").read_text())["mtmd_self_test"]
    assert recorded["passed"] is False and recorded["min_cosine"] < 0.9
    fresh = mtmd_self_test(_only(gguf_7b_f32, "text"), _only(gguf_7b_f32, "mmproj"), gguf_7b_f32 / "vision.onnx")
    assert fresh["passed"] is False and fresh["min_cosine"] == pytest.approx(recorded["min_cosine"], abs=1e-4)


# --------------------------------------------------------------- errors ----
def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def _one_sentence(message: str) -> bool:
    return message.count(". ") == 0 and message.endswith(".") and "\n" not in message


def test_missing_manifest(gguf_7b_f16, tmp_path):
    from huatuo_lite.errors import ModelFormatError

    folder = _copy(gguf_7b_f16, tmp_path)
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelFormatError) as info:
        open_gguf(folder)
    assert "manifest.json" in str(info.value) and _one_sentence(str(info.value))


def test_truncated_gguf(gguf_7b_f16, tmp_path):
    from huatuo_lite.errors import ModelFormatError

    folder = _copy(gguf_7b_f16, tmp_path)
    text = _only(folder, "text")
    data = text.read_bytes()
    text.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError) as info:
        open_gguf(folder)
    assert text.name in str(info.value) and "truncated" in str(info.value) and _one_sentence(str(info.value))
    # the same file with a manifest that agrees on its size: llama.cpp refuses it, one sentence too
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][text.name]["size"] = text.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError) as info:
        open_gguf(folder)
    assert text.name in str(info.value) and _one_sentence(str(info.value))


def test_mismatched_mmproj(gguf_7b_f16, tmp_path_factory, tmp_path):
    """An mmproj from another model (other width) dropped in under the expected name."""
    from huatuo_lite.convert.gguf.export import export_gguf
    from huatuo_lite.convert.tiny.make import make_tiny
    from huatuo_lite.errors import ModelFormatError

    wide = make_tiny(tmp_path_factory.mktemp("tiny-wide") / "m", variant="7b", hidden_size=512, num_heads=8)
    other = tmp_path_factory.mktemp("gguf-wide")
    export_gguf(wide, other, quant="F16", vision_onnx=False)
    folder = _copy(gguf_7b_f16, tmp_path)
    mine = _only(folder, "mmproj")
    shutil.copyfile(_only(other, "mmproj"), mine)
    with pytest.raises(ModelFormatError) as info:
        open_gguf(folder)
    message = str(info.value)
    print(message)
    assert mine.name in message and "512" in message and "256" in message and _one_sentence(message)


def test_slow_tokenizer_files_give_the_same_vocab(tiny_7b, tmp_path):
    """Some hub folders ship only vocab.json + merges.txt: same tokens, types and merges."""
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.gguf.text import VOCAB_READERS

    rows = open_checkpoint(tiny_7b).text.vocab_size
    folder = _copy(tiny_7b, tmp_path)
    fast = VOCAB_READERS["qwen2"](folder, rows)
    (folder / "tokenizer.json").unlink()
    assert VOCAB_READERS["qwen2"](folder, rows) == fast and len(fast["merges"]) > 100


def test_passed_self_test_switches_images_to_libmtmd(gguf_7b_f32, tmp_path):
    """The day the self-test passes, the backend takes libmtmd's features by itself."""
    from huatuo_lite.backends.gguf_mtmd import MtmdEncoder

    folder = _copy(gguf_7b_f32, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["mtmd_self_test"]["passed"] = True
    (folder / "manifest.json").write_text(json.dumps(manifest))
    engine = open_gguf(folder)
    try:
        assert isinstance(engine._images, MtmdEncoder)
        assert engine.encode_images(random_pixels(2)).shape == (2, 576, engine.hidden_size)
    finally:
        engine.close()


def _template_env():
    """jinja2 set up as llama-cpp-python's MTMDChatHandler sets it up."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def test_chat_template_renders_the_upstream_prompt():
    """The embedded template gives prompt.render's text for every way content arrives:
    OpenAI/HF image parts, MTMDChatHandler's marker parts, and strings holding libmtmd's
    marker with no newline after it (llama-mtmd-cli -p "Q", llama-server's joined parts) or
    with one (marker where <image> was, one newline after it in every case)."""
    from llama_cpp import mtmd_cpp

    from huatuo_lite.convert.gguf.text import MTMD_MARKER, chat_template
    from huatuo_lite.prompt import Turn, render

    assert mtmd_cpp.mtmd_default_marker().decode() == MTMD_MARKER
    template = _template_env().from_string(chat_template())
    expected = render([Turn("What is it? ", 2, "A lung."), Turn("And now?", 1)])
    m = MTMD_MARKER
    contents = [  # (first turn's content, last turn's content, what stands for <image>)
        ([{"type": "image_url", "image_url": {"url": "x"}}] * 2 + [{"type": "text", "text": "What is it? "}],
         [{"type": "image"}, {"type": "text", "text": "And now?"}], "<image>"),
        ([{"type": "text", "text": m}] * 2 + [{"type": "text", "text": "What is it? "}],
         [{"type": "text", "text": m}, {"type": "text", "text": "And now?"}], m),
        (m + m + "What is it? ", m + "And now?", m),                 # llama-mtmd-cli's -p
        (f"{m}\n{m}\nWhat is it? ", f"{m}\nAnd now?", m),           # upstream's layout
        ("What is it? " + m + m, "And now?" + m, m),                 # images after the text
    ]
    for first, last, image in contents:
        messages = [{"role": "user", "content": first}, {"role": "assistant", "content": "A lung."},
                    {"role": "user", "content": last}]
        assert template.render(messages=messages) == expected.replace("<image>", image), (first, last)
    plain = [{"role": "user", "content": "Hello"}]
    assert template.render(messages=plain) == render([Turn("Hello")])
    two_texts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"},
                                              {"type": "text", "text": "there"}]}]
    assert template.render(messages=two_texts) == render([Turn("Hi\nthere", 1)])   # as message_parts joins


def _png_url(value: int = 128) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((336, 336, 3), value, np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_mtmd_chat_handler_renders_our_prompt_from_the_gguf(gguf_7b_f32):
    """llama-cpp-python's own MTMDChatHandler, given the template read back from the GGUF,
    renders upstream's prompt with libmtmd's marker where <image> goes."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from huatuo_lite.convert.gguf.text import MTMD_MARKER
    from huatuo_lite.prompt import Turn, render

    stored = _value(_reader(_only(gguf_7b_f32, "text")), "tokenizer.chat_template")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": "What is shown?"}]}]
    converted = MTMDChatHandler._get_template_messages(MTMDChatHandler, messages, MTMD_MARKER)
    rendered = _template_env().from_string(stored).render(messages=converted, add_generation_prompt=True)
    assert rendered == render([Turn("What is shown?", 1)]).replace("<image>", MTMD_MARKER)


def test_stock_llama_cpp_python_loads_the_pair(gguf_7b_f32):
    """Stock llama-cpp-python (Llama + MTMDChatHandler) runs our pair with its embedded template
    and evaluates exactly as many prompt tokens as huatuo-lite's GGUF backend (text + 576 per image)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    from PIL import Image

    from huatuo_lite.families.llava import GenerationConfig
    from huatuo_lite.generate import run

    question = "What is shown?"
    handler = MTMDChatHandler(clip_model_path=str(_only(gguf_7b_f32, "mmproj")), verbose=False, use_gpu=False)
    llm = Llama(str(_only(gguf_7b_f32, "text")), chat_handler=handler, n_ctx=1024, n_threads=1, verbose=False)
    try:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_url()}}, {"type": "text", "text": question}]}],
            max_tokens=4, temperature=0.0)
    finally:
        llm.close()
    engine = open_gguf(gguf_7b_f32)
    try:
        generation = run(engine, [Image.new("RGB", (336, 336), (128, 128, 128))], question,
                         config=GenerationConfig(temperature=0.0, max_new_tokens=1))
        for _ in generation:
            pass
    finally:
        engine.close()
    assert out["usage"]["completion_tokens"] >= 1
    assert out["usage"]["prompt_tokens"] == generation.answer.prompt_tokens > 576


def test_one_folder_holds_several_quants(gguf_7b_f16, tiny_7b, tiny_34b, tmp_path):
    """A second conversion of the same checkpoint adds its files to the folder's manifest;
    another model's conversion into it is refused in one sentence."""
    from huatuo_lite.convert.gguf.export import export_gguf
    from huatuo_lite.errors import HuatuoError

    folder = _copy(gguf_7b_f16, tmp_path)
    export_gguf(tiny_7b, folder, quant="Q8_0", vision_onnx=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(e["quant"] for e in manifest["files"].values() if e["role"] == "text") == ["F16", "Q8_0"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest["files"], "manifest.json", "Modelfile",
                                                               "README.md"])
    assert "Other text quants in this folder: F16" in (folder / "Modelfile").read_text()
    assert "Quants: F16, Q8_0." in (folder / "README.md").read_text()
    for quant, expected in ((None, "Q8_0"), ("F16", "F16")):
        engine = open_gguf(folder, quant=quant)
        assert engine.text_path.name.endswith(f"-{expected}.gguf")
        engine.close()
    with pytest.raises(HuatuoError) as info:
        export_gguf(tiny_34b, folder, quant="F16", vision_onnx=False)
    assert "another model" in str(info.value) and _one_sentence(str(info.value))


def test_verdict_of_another_llama_cpp_is_tested_again(gguf_7b_f32, tmp_path):
    """A manifest written under another llama-cpp-python is not trusted: the engine runs the
    self-test afresh (here it fails again, so images go through vision.onnx)."""
    from huatuo_lite.backends.vision_onnx import OnnxVisionEncoder

    folder = _copy(gguf_7b_f32, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["mtmd_self_test"].update(passed=True, llama_cpp_python="0.0.1")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    engine = open_gguf(folder)
    try:
        assert isinstance(engine._images, OnnxVisionEncoder)
    finally:
        engine.close()
