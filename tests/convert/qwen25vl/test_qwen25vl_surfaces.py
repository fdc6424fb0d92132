"""Every user surface on a Qwen2.5-VL folder (the tiny checkpoint converted to GGUF F32, and
ONNX fp32 where cheap): `ask` (plain and --json, the research notice), DICOM input, a two-turn
`chat`, the OpenAI-compatible server, `batch`, `eval` with the model's own generation defaults,
`eval --compare` against the torch reference, `models info/list`, and the disk caches. Each
surface is compared with the Python API's greedy answer on the same folder, which
test_qwen25vl_gguf_answers.py proves equal to transformers' generate token for token."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from qwen_helpers import LAYOUTS, noise_image, open_processor, user_message

from support.engines import skip_without

skip_without("torch", "transformers", "gguf", "llama_cpp", "onnxruntime")

from huatuo_lite import api  # noqa: E402
from huatuo_lite.cli.main import cli  # noqa: E402
from huatuo_lite.prompt import Turn  # noqa: E402

GREEDY = ["--temperature", "0", "--max-tokens", "8", "--threads", "1"]
QUESTION = "What is shown?"


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)


def assert_one_sentence_error(result, *words):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = [line for line in result.output.strip().splitlines() if line.strip()][-1]
    assert last.startswith("Error:"), result.output
    for word in words:
        assert word in last, last


@pytest.fixture(scope="module")
def folders(qwen_tiny_folders, tmp_path_factory):
    """The upstream tiny folder and its GGUF F32 and ONNX fp32 conversions."""
    from huatuo_lite.convert.onnx.export import export_onnx
    from huatuo_lite.convert.qwen25vl.gguf import export_qwen25vl_gguf

    tiny = qwen_tiny_folders[LAYOUTS[0]]
    root = tmp_path_factory.mktemp("qwen-surfaces")
    export_qwen25vl_gguf(tiny, root / "gguf", quant="F32", mmproj_type="F32", threads=1)
    export_onnx(tiny, root / "onnx", quant="fp32", vision_quant="fp32")
    return SimpleNamespace(tiny=tiny, gguf=root / "gguf", onnx=root / "onnx", root=root)


@pytest.fixture(scope="module")
def model(folders):
    with api.load(str(folders.gguf), threads=1) as hv:
        yield hv


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two noise images of different sizes (144 and 128 image tokens), in an images/ folder."""
    folder = tmp_path_factory.mktemp("qwen-surface-images") / "images"
    folder.mkdir()
    paths = []
    for width, height in ((336, 336), (448, 224)):
        paths.append(folder / f"scan-{width}x{height}.png")
        noise_image(width, height, seed=width * height).save(paths[-1])
    return paths


def greedy(model, images, question, max_new_tokens=8, **gen):
    return model.ask([str(p) for p in images], question, temperature=0, max_new_tokens=max_new_tokens, **gen)


# ------------------------------------------------------------------ ask ----
def test_ask_answers_as_the_api_with_the_notice(folders, model, images, monkeypatch):
    monkeypatch.delenv("HUATUO_LITE_NO_NOTICE", raising=False)
    want = greedy(model, images[:1], QUESTION)
    assert want.completion_tokens > 0 and want.text
    plain = invoke("ask", "--model", folders.gguf, images[0], QUESTION, *GREEDY)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.strip() == want.text
    assert "research use only" in plain.stderr                 # as for the LLaVA family
    as_json = invoke("ask", "--model", folders.gguf, images[0], QUESTION, *GREEDY, "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["answer"] == want.text and data["usage"] == want.usage()
    assert data["prompt_tokens"] == want.prompt_tokens and data["backend"] == "gguf"
    assert {"image_encode_s", "prefill_s", "decode_s", "prompt_n", "predicted_n", "image_ms"} <= set(data["timings"])
    assert data["timings"]["predicted_n"] == want.completion_tokens


def test_sampling_help_says_each_familys_defaults():
    """An unset option takes the model's own default, not LLaVA's: --help says both."""
    from huatuo_lite.families import llava, qwen25vl

    text = " ".join(invoke("ask", "--help").stdout.split())
    for option, name in (("--temperature", "temperature"), ("--repetition-penalty", "repetition_penalty")):
        said = text.split(f"{option} FLOAT", 1)[1].split(" --", 1)[0]
        assert f"llava {getattr(llava.GENERATION_DEFAULTS, name)}" in said
        assert f"qwen25vl {getattr(qwen25vl.GENERATION_DEFAULTS, name)}" in said


def test_ask_through_onnx_answers_as_gguf(folders, model, images):
    want = greedy(model, images[1:], QUESTION)
    result = invoke("ask", "-q", "--model", folders.onnx, images[1], QUESTION, *GREEDY, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["backend"] == "onnx" and data["answer"] == want.text and data["usage"] == want.usage()


# ---------------------------------------------------------------- DICOM ----
def dicom_file(path, raw: np.ndarray, photometric: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(raw, photometric, 16)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_answers_as_the_png_of_its_pixels(folders, tmp_path):
    """A 16-bit DICOM without a window is scaled by its value range onto 0..255 (MONOCHROME1
    inverted); the answer equals the one for a grayscale PNG of those pixels."""
    pytest.importorskip("pydicom")
    from PIL import Image

    from huatuo_lite.families import qwen25vl
    from huatuo_lite.image.load import load_image

    raw = np.random.default_rng(11).integers(500, 4000, (200, 300), dtype=np.uint16)   # 300 wide, 200 tall
    scaled = np.rint((raw - raw.min()) * 255.0 / (raw.max() - raw.min())).astype(np.uint8)
    answers = {}
    for photometric, gray in (("MONOCHROME2", scaled), ("MONOCHROME1", 255 - scaled)):
        dcm = dicom_file(tmp_path / f"{photometric}.dcm", raw, photometric)
        png = tmp_path / f"{photometric}.png"
        Image.fromarray(gray, "L").save(png)
        np.testing.assert_array_equal(np.asarray(load_image(dcm))[..., 0], gray)
        pair = []
        for path in (dcm, png):
            result = invoke("ask", "-q", "--model", folders.gguf, path, QUESTION, *GREEDY, "--json")
            assert result.exit_code == 0, result.output
            pair.append(json.loads(result.stdout))
        assert pair[0]["answer"] == pair[1]["answer"] and pair[0]["usage"] == pair[1]["usage"]
        # the image tokens follow smart_resize of the DICOM's own size
        rows, cols = (s // 28 for s in qwen25vl.smart_resize(200, 300, qwen25vl.MIN_PIXELS, qwen25vl.MAX_PIXELS))
        text_only = json.loads(invoke("ask", "-q", "--model", folders.gguf, QUESTION, *GREEDY, "--json").stdout)
        assert pair[0]["prompt_tokens"] == text_only["prompt_tokens"] + rows * cols + 2   # + vision start/end
        answers[photometric] = pair[0]["answer"]
    assert answers["MONOCHROME1"] != answers["MONOCHROME2"], "the answer ignores the pixels: the test proves nothing"


# ----------------------------------------------------------------- chat ----
def prompt_ids(generation, pad_id: int) -> list:
    from huatuo_lite.backends.base import position_keys

    return [k if isinstance(k, int) else pad_id for k in position_keys(generation.segments)]


def test_chat_second_turn_renders_the_first_answer_as_the_template(folders, model, images):
    from PIL import Image

    from huatuo_lite.families import qwen25vl

    gen = dict(temperature=0, max_new_tokens=8)
    session = model.chat()
    first = session.ask(QUESTION, images=[str(images[0])], **gen)
    second_prompt = model.generation([], "Is it normal?", history=session.turns, history_images=session.images, **gen)
    second = session.ask("Is it normal?", **gen)

    processor = open_processor(folders.tiny)
    messages = [user_message(1, QUESTION), {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                user_message(0, "Is it normal?")]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert qwen25vl.render([session.turns[0], Turn("Is it normal?", 0)]) == text
    want_ids = processor(text=[text], images=[Image.open(images[0]).convert("RGB")])["input_ids"][0]
    pad_id = processor.tokenizer.convert_tokens_to_ids(qwen25vl.IMAGE_PAD)
    assert prompt_ids(second_prompt, pad_id) == list(want_ids)
    assert second.prompt_tokens == len(want_ids)

    with api.load(str(folders.gguf), threads=1) as fresh:       # a fresh engine: no KV state kept
        assert greedy(fresh, images[:1], QUESTION).token_ids == first.token_ids
        generation = fresh.generation([], "Is it normal?", history=[Turn(QUESTION, 1, first.text)],
                                      history_images=[str(images[0])], **gen)
        with fresh.lock:
            for _ in generation:
                pass
    assert generation.answer.token_ids == second.token_ids and second.completion_tokens > 0


def test_chat_command_answers_as_the_session(folders, model, images):
    """`huatuo-lite chat` with questions on stdin: each answer line as ChatSession's."""
    session = model.chat()
    want = [session.ask(QUESTION, images=[str(images[1])], temperature=0, max_new_tokens=8).text,
            session.ask("Is it normal?", temperature=0, max_new_tokens=8).text]
    result = invoke("chat", "-q", "-m", folders.gguf, *GREEDY, images[1], input=f"{QUESTION}\nIs it normal?\n")
    assert result.exit_code == 0, result.output
    said = [line.removeprefix(">").strip() for line in result.stdout.splitlines() if line.strip(" >")]
    assert said == want


# ---------------------------------------------------------------- serve ----
def test_server_answers_an_image_url_as_the_api(model, images):
    import base64

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from huatuo_lite.server.policy import ServerSettings
    from huatuo_lite.server.run import background_server
    from support.server_http import raw, user

    want = greedy(model, images[1:], QUESTION)
    uri = "data:image/png;base64," + base64.b64encode(images[1].read_bytes()).decode()
    body = {"model": "qwen-tiny", "messages": user(QUESTION, uri), "temperature": 0, "max_tokens": 8}
    with background_server(model, ServerSettings(model_id="qwen-tiny")) as url:
        status, whole = raw(url + "/v1/chat/completions", body, key=None)
        _, streamed = raw(url + "/v1/chat/completions", {**body, "stream": True}, key=None)
        _, health = raw(url + "/health", key=None)
        refused = raw(url + "/v1/chat/completions", {**body, "messages": user("Is <|im_end|> it?", uri)}, key=None)
    assert status == 200, whole
    assert whole["choices"][0]["message"]["content"] == want.text and whole["usage"] == want.usage()
    assert whole["choices"][0]["finish_reason"] == want.finish_reason
    chunks = [json.loads(e.removeprefix("data: ")) for e in streamed.split("\n\n") if e.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).strip() == want.text
    assert health["backend"] == "gguf"
    assert refused[0] == 400 and "'<|im_end|>'" in refused[1]["error"]["message"]


# -------------------------------------------------------- batch and eval ----
def test_batch_answers_pubmedvision_records_as_the_api(folders, model, images, tmp_path):
    records = [{"id": f"r{i}", "image": [f"images/{p.name}"],
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "A."}]}
               for i, (p, q) in enumerate(zip(images, ("What is shown?", "Which organ is this?")))]
    data = images[0].parent.parent / "pmv.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = invoke("batch", data, "-m", folders.gguf, "-o", out, "--threads", "1", "--max-tokens", "6",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1"]
    for row, image, record in zip(rows, images, records):
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        want = greedy(model, [image], question, max_new_tokens=6)
        assert row["output"] == want.text and row["prompt_tokens"] == want.prompt_tokens


def test_batch_answers_at_most_the_models_own_max_new_tokens(folders, images, tmp_path):
    """Without --max-tokens a question takes the model's own max_new_tokens (here a copy whose
    manifest records 3), not LLaVA's."""
    copy = Path(shutil.copytree(folders.gguf, tmp_path / "short"))
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    manifest["generation"]["max_new_tokens"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    data = images[0].parent.parent / "one.json"
    data.write_text(json.dumps([{"question": QUESTION, "image": f"images/{images[0].name}"}]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = invoke("batch", data, "-m", copy, "-o", out, "--threads", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text(encoding="utf-8"))
    assert row["completion_tokens"] == 3 and row["finish_reason"] == "length", row


def test_eval_uses_the_models_own_generation_defaults(folders, model, tmp_path):
    from huatuo_lite.convert.synth.make import make_synthetic_set
    from huatuo_lite.eval.run import load_items
    from huatuo_lite.families.common import EVAL_MAX_NEW_TOKENS
    from huatuo_lite.families.llava import GENERATION_DEFAULTS as LLAVA_DEFAULTS

    synth = make_synthetic_set(tmp_path / "set", n_train=0, n_val=0, n_test=1, seed=3)
    out = tmp_path / "report"
    result = invoke("eval", synth["test_vqa"], "-m", folders.gguf, "--limit", 3, "-o", out, "--no-progress",
                    "--threads", 1)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    manifest = json.loads((folders.gguf / "manifest.json").read_text(encoding="utf-8"))
    penalty = manifest["generation"]["repetition_penalty"]
    assert penalty == json.loads((folders.tiny / "generation_config.json").read_text())["repetition_penalty"]
    assert penalty != LLAVA_DEFAULTS.repetition_penalty
    assert report["generation"]["repetition_penalty"] == penalty and report["total"]["count"] == 3
    assert f"repetition penalty {penalty}" in result.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    items, _ = load_items(synth["test_vqa"], 3)
    answers = [greedy(model, item.images, item.prompt, EVAL_MAX_NEW_TOKENS) for item in items]
    assert [r["output"] for r in rows] == [a.text for a in answers]
    llava_penalty = [greedy(model, item.images, item.prompt, EVAL_MAX_NEW_TOKENS,
                            repetition_penalty=LLAVA_DEFAULTS.repetition_penalty).text for item in items]
    assert llava_penalty != [a.text for a in answers], "the penalty changes no answer: the test proves nothing"


def test_eval_compare_reference_gguf_onnx_agree(folders, tmp_path, monkeypatch):
    from huatuo_lite.convert.synth.make import make_synthetic_set

    synth = make_synthetic_set(tmp_path / "set", n_train=0, n_val=0, n_test=1, seed=4)
    out = tmp_path / "fidelity"
    specs = f"reference,gguf:F32={folders.gguf},onnx:fp32={folders.onnx}"
    loads, real_load = [], api.load

    def load(model, **options):
        loads.append(options)
        return real_load(model, **options)

    monkeypatch.setattr(api, "load", load)
    result = invoke("eval", synth["test_vqa"], "-m", folders.tiny, "--compare", specs, "--limit", 3, "-o", out,
                    "--no-progress", "--threads", 1)
    assert result.exit_code == 0, result.output
    assert len(loads) == 3 and all(o.get("threads") == 1 for o in loads), loads     # --threads reaches every engine
    rows = json.loads((out / "fidelity.json").read_text(encoding="utf-8"))
    assert [r["spec"] for r in rows] == ["reference", "gguf:F32", "onnx:fp32"]
    assert all(r["count"] == 3 and r["agreement"] == 1.0 for r in rows), rows
    outputs = [[json.loads(line)["output"] for line in (out / slug / "results.jsonl").read_text().splitlines()]
               for slug in ("reference", "gguf-F32", "onnx-fp32")]
    assert outputs[0] and all(o == outputs[0] for o in outputs)      # greedy answers, token for token


# --------------------------------------------------------------- models ----
def test_models_info_and_list_name_the_family(folders, tmp_path, monkeypatch):
    for folder in (folders.tiny, folders.gguf, folders.onnx):
        result = invoke("models", "info", folder)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["family"] == "qwen25vl"
    monkeypatch.setenv("HUATUO_LITE_HOME", str(tmp_path))
    shutil.copytree(folders.gguf, tmp_path / "models" / "qwen-tiny")
    listed = invoke("models", "list")
    line = next(line for line in listed.stdout.splitlines() if line.startswith("qwen-tiny"))
    assert line.split()[1:4] == ["installed", "gguf", "qwen25vl"]


# --------------------------------------------------------------- caches ----
def test_batch_answers_equal_with_and_without_the_disk_cache(folders, images, tmp_path, monkeypatch):
    """4 questions over 2 images of different sizes: no cache, a cold cache, a warm cache
    (prefix KV state and features read back from disk) give the same answers."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HUATUO_LITE_CACHE", str(cache))
    records = [{"question": q, "image": [f"images/{p.name}"]}
               for p in images for q in ("What is shown?", "Is there a lesion?")]
    data = images[0].parent.parent / "four.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    outputs = []
    for name, flags in (("none", ["--no-cache"]), ("cold", []), ("warm", [])):
        out = tmp_path / f"{name}.jsonl"
        result = invoke(*flags, "batch", data, "-m", folders.gguf, "-o", out, "--threads", "1", "--max-tokens", "8",
                        "--no-progress", env={"HUATUO_LITE_NO_CACHE": None})
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert not any(r.get("error") for r in rows), rows
        outputs.append([r["output"] for r in rows])
        if name == "none":
            assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
    assert outputs[0] == outputs[1] == outputs[2] and len(set(outputs[0])) == 4
    with api.load(str(folders.gguf), threads=1) as warm:         # a new load reads the prefix from disk
        answer = greedy(warm, images[1:], "Is there a lesion?")
    assert answer.timings["prefix_cache_hit"] == 1 and answer.text == outputs[0][3]


# ------------------------------------------------------------ bad input ----
def test_a_question_holding_a_turn_marker_is_one_sentence(folders, images):
    result = invoke("ask", "-q", "--model", folders.gguf, images[0], "Is it <|im_end|> normal?", *GREEDY)
    assert_one_sentence_error(result, "'<|im_end|>'", "remove it")


def test_an_image_too_large_for_the_context_is_one_sentence(folders, tmp_path):
    from huatuo_lite.errors import PromptError

    path = tmp_path / "large.png"
    noise_image(448, 448, seed=9).save(path)                        # 256 image tokens
    with api.load(str(folders.gguf), threads=1, n_ctx=256) as small:
        with pytest.raises(PromptError, match=r"256 per image.*context of 256.*smaller images"):
            greedy(small, [path], QUESTION)


def test_an_image_too_large_for_the_context_is_refused_before_encoding(folders, tmp_path):
    from huatuo_lite.errors import PromptError

    path = tmp_path / "large.png"
    noise_image(448, 448, seed=10).save(path)
    with api.load(str(folders.gguf), threads=1, n_ctx=256) as small:
        def refuse(pixels):
            raise AssertionError("the image was encoded before the context check")

        small.engine.encode_images = refuse    # a 3000x3000 image took 85 s to encode before being refused
        with pytest.raises(PromptError, match="256 per image.*smaller images"):
            greedy(small, [path], QUESTION)
