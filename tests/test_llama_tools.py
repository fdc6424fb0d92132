"""The native llama.cpp tools built by CMakeLists.txt: our GGUFs in stock llama-mtmd-cli,
the LLaVA class-token fix, and importance-matrix quantization.

The tests that run the tools are skipped where they are not built. CI does not build
them: the CMake build of llama.cpp takes ~15 min (2 cores) or far more on a loaded
runner, too much of the CI budget for one module; run `cmake -S . -B build
-DCMAKE_BUILD_TYPE=Release && cmake --build build -j 2` and these tests run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from huatuo_lite.llama_tools import find_tool, lib_env, mtmd_cli_answer, native_lib_dir, stock_mtmd_dir

SKIP_REASON = ("llama.cpp's native tools are not built (no build/bin/llama-mtmd-cli): CI skips these "
               "tests because the CMake build of llama.cpp takes ~15 min on 2 cores; build with "
               "`cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j 2`")
TOOLS_BUILT = find_tool("llama-mtmd-cli", required=False) is not None and native_lib_dir() is not None
requires_tools = pytest.mark.skipif(not TOOLS_BUILT, reason=SKIP_REASON)


def requires_tool(name: str):
    """Skip, saying why, where one tool of the build is missing (a partial build:
    `cmake --build build --target llama-mtmd-cli` builds that tool alone)."""
    missing = find_tool(name, required=False) is None
    return pytest.mark.skipif(missing, reason=f"{name} is not built (build/bin); build it with "
                                              f"`cmake --build build --target {name}`")

from support.engines import QUESTIONS, open_gguf, skip_without
skip_without('torch', 'gguf', 'llama_cpp')


from huatuo_lite.families.llava import GenerationConfig  # noqa: E402
from huatuo_lite.manifest import read_manifest  # noqa: E402

N_PREDICT = 16
# Greedy with upstream's repetition penalty (llama.cpp's penalty is HF's formula): without it a
# random tiny model repeats one token whatever the image, and the comparison would prove nothing.
GREEDY = GenerationConfig(temperature=0.0, repetition_penalty=1.2, max_new_tokens=N_PREDICT)
CLI_TIMEOUT_S = 300


def _files(folder: Path) -> dict:
    """role -> path of a converted folder's files."""
    files = read_manifest(folder)["files"]
    return {entry["role"]: folder / name for name, entry in files.items()}


@pytest.fixture(scope="module")
def square_images(tmp_path_factory):
    """Two 336x336 RGB images: libmtmd's own resize/pad leaves them unchanged (see gguf-contract.md)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("native-img")
    paths = []
    for seed in (7, 8):
        rgb = np.random.default_rng(seed).integers(0, 256, (336, 336, 3), dtype=np.uint8)
        Image.fromarray(rgb, "RGB").save(folder / f"scan{seed}.png")
        paths.append(folder / f"scan{seed}.png")
    return paths


def cli_answer(folder: Path, image: Path, question: str, libmtmd_dir: Path | None = None) -> bytes:
    files = _files(folder)
    return mtmd_cli_answer(files["text"], files["mmproj"], [image], question, N_PREDICT, libmtmd_dir=libmtmd_dir,
                           extra_args=["--repeat-penalty", GREEDY.repetition_penalty])


def backend_answer(folder: Path, image: Path, question: str) -> bytes:
    """The GGUF backend's greedy answer as the bytes of its tokens (a random model's
    tokens may split characters, so bytes, not text, are compared)."""
    from huatuo_lite.generate import run

    engine = open_gguf(folder)  # noqa: F405
    try:
        generation = run(engine, [str(image)], question, config=GREEDY)
        for _ in generation:
            pass
        return b"".join(engine.token_bytes(t) for t in generation.answer.token_ids).strip()
    finally:
        engine.close()


def test_patch_matches_the_source_it_fixes():
    """The patch swaps the operands of the one class-embedding concat, nothing else."""
    patch = (Path(__file__).parent.parent / "native" / "llava-class-token-order.patch").read_text()
    removed = [line for line in patch.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line for line in patch.splitlines() if line.startswith("+") and not line.startswith("+++")]
    code = lambda lines: [x for x in lines if not x[1:].strip().startswith("//")]  # noqa: E731
    assert code(removed) == ["-        inp = ggml_concat(ctx0, inp, model.class_embedding, 1);"]
    assert code(added) == ["+        inp = ggml_concat(ctx0, model.class_embedding, inp, 1);"]


@requires_tools
def test_mtmd_cli_answers_like_our_backend(gguf_7b_f32, square_images, tmp_path):
    """Built (fixed) llama-mtmd-cli on our text GGUF + mmproj gives our GGUF backend's greedy
    answer, byte for byte, for two images whose answers differ (so the image matters).
    Stock libmtmd's answers are printed: on this random tiny model they happen to match
    (its features are wrong, see the self-test below, but not enough to flip a token);
    native/stock_drift.py measures the drift on the trained demo model."""
    question = QUESTIONS[0]
    ours = [backend_answer(gguf_7b_f32, image, question) for image in square_images]
    fixed = [cli_answer(gguf_7b_f32, image, question) for image in square_images]
    stock_dir = stock_mtmd_dir(tmp_path / "stock")
    stock = [cli_answer(gguf_7b_f32, image, question, libmtmd_dir=stock_dir) for image in square_images]
    print({"ours": ours, "fixed_cli": fixed, "stock_cli": stock})
    assert all(len(a) > 0 for a in ours) and ours[0] != ours[1]
    assert fixed == ours


DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


@requires_tools
@pytest.mark.skipif(not (DEMO / "gguf").is_dir(), reason="models/demo is not in this checkout")
def test_mtmd_cli_answers_like_our_backend_on_the_trained_demo():
    """The same check on the shipped, trained demo model (Q8_0 + F16 mmproj), on its first
    eval questions in the upstream protocol: a model that reads the image, so a wrong image
    path would change the letters."""
    from huatuo_lite.eval.run import build_prompt

    items = json.loads((DEMO / "eval" / "eval.json").read_text(encoding="utf-8"))[:6]
    for item in items:
        image, question = DEMO / "eval" / item["image"][0], build_prompt(item["question"], item["options"])
        ours = backend_answer(DEMO / "gguf", image, question)
        assert cli_answer(DEMO / "gguf", image, question) == ours, item["id"]


def _self_test_in_subprocess(folder: Path, env: dict) -> dict:
    files = _files(folder)
    code = ("import json,sys; from huatuo_lite.backends.gguf_mtmd import mtmd_self_test; "
            "print(json.dumps(mtmd_self_test(*sys.argv[1:4], threads=1)))")
    done = subprocess.run([sys.executable, "-c", code, str(files["text"]), str(files["mmproj"]),
                           str(files["vision"])], capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@requires_tools
def test_fixed_libmtmd_passes_the_self_test_stock_fails(gguf_7b_f32):
    """llama-cpp-python pointed at the built libraries (LLAMA_CPP_LIB_PATH, MTMD_CPP_LIB)
    computes image features like vision.onnx; its own stock libmtmd does not."""
    fixed = _self_test_in_subprocess(gguf_7b_f32, lib_env(native_lib_dir()))
    stock_env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    stock = _self_test_in_subprocess(gguf_7b_f32, stock_env)
    print(json.dumps({"fixed": fixed, "stock": stock}))
    assert fixed["passed"] and fixed["min_cosine"] > 0.999
    assert not stock["passed"] and stock["min_cosine"] < 0.99


# ------------------------------------------------------------- imatrix ----
def calibration_records(n: int = 80) -> list[dict]:
    """Eval-format and PubMedVision-format question/answer records (text only)."""
    from huatuo_lite.convert.synth.text import ANSWER_TEXT, KIND_OPTIONS, QUESTIONS

    records = []
    for i in range(n):
        kind = list(QUESTIONS)[i % len(QUESTIONS)]
        lang = ("en", "zh")[i % 2]
        question = QUESTIONS[kind][lang][i % len(QUESTIONS[kind][lang])]
        options = [ANSWER_TEXT[lang][k] for k in KIND_OPTIONS[kind]]
        answer = options[i % len(options)]
        if i % 3:
            records.append({"question": question, "options": options, "answer": answer})
        else:
            records.append({"image": ["images/x.png"], "conversations": [
                {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})
    return records


@pytest.fixture(scope="module")
def calibration_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.json"
    path.write_text(json.dumps(calibration_records(), ensure_ascii=False), encoding="utf-8")
    return path


@requires_tools
@requires_tool("llama-imatrix")
@requires_tool("llama-quantize")
def test_convert_gguf_with_imatrix(tiny_7b, calibration_json, tmp_path):
    """`convert gguf --imatrix` quantizes with an importance matrix, records it in the
    manifest, and gives a different (imatrix-weighted) Q4_K_M than the plain one."""
    from click.testing import CliRunner

    from huatuo_lite.cli.main import cli

    imat, plain = tmp_path / "imat", tmp_path / "plain"
    result = CliRunner().invoke(cli, ["convert", "gguf", str(tiny_7b), str(imat), "--quant", "Q4_K_M",
                                      "--imatrix", str(calibration_json)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from huatuo_lite.convert.gguf.export import export_gguf

    export_gguf(tiny_7b, plain, quant="Q4_K_M", vision_onnx=False, threads=1)
    (text_name, entry), = [(n, e) for n, e in read_manifest(imat)["files"].items() if e["role"] == "text"]
    record = entry["imatrix"]
    assert record["calibration"] == "calib.json" and record["records"] == 80
    assert record["chunks"] >= 2 and record["entries"] > 0 and "commit" in record["llama_cpp"]
    plain_entry = [e for e in read_manifest(plain)["files"].values() if e["role"] == "text"][0]
    assert entry["sha256"] != plain_entry["sha256"]
    assert not list(imat.glob(".*")), "temporary files left behind"


def test_imatrix_refused_for_direct_types(tiny_7b, calibration_json, tmp_path):
    from huatuo_lite.convert.gguf.export import export_gguf
    from huatuo_lite.errors import HuatuoError

    with pytest.raises(HuatuoError, match="--imatrix"):
        export_gguf(tiny_7b, tmp_path / "x", quant="Q8_0", imatrix=calibration_json)


def test_calibration_without_records_is_one_sentence(tmp_path):
    from huatuo_lite.convert.gguf.imatrix import calibration_text
    from huatuo_lite.errors import HuatuoError

    path = tmp_path / "empty.json"
    path.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(HuatuoError, match="no question/answer records"):
        calibration_text(path)


# ---------------------------------------------------- finding the tools ----
def test_missing_tool_is_one_sentence_with_the_build_command(tmp_path, monkeypatch):
    from huatuo_lite import llama_tools as native
    from huatuo_lite.errors import HuatuoError

    monkeypatch.setattr(native, "candidate_dirs", lambda: [tmp_path])
    monkeypatch.setenv("PATH", str(tmp_path))
    assert native.find_tool("llama-imatrix", required=False) is None
    with pytest.raises(HuatuoError, match=r"llama-imatrix was not found: build them with `cmake -S \. -B build"):
        native.find_tool("llama-imatrix")
    with pytest.raises(HuatuoError, match="Unknown llama.cpp tool"):
        native.find_tool("llama-server")


def test_env_var_folder_is_searched_first(tmp_path, monkeypatch):
    from huatuo_lite import llama_tools as native

    tool = tmp_path / "llama-bench"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv(native.BIN_ENV, str(tmp_path))
    assert native.find_tool("llama-bench") == tool


def test_tools_get_their_own_libraries_first(tmp_path):
    """Importing llama_cpp puts its library folder on LD_LIBRARY_PATH; a tool must not load those."""
    from huatuo_lite.llama_tools import tool_env

    env = tool_env(tmp_path / "bin" / "llama-mtmd-cli", {"LD_LIBRARY_PATH": "/site/llama_cpp/lib"},
                   libs_first=[tmp_path / "stock"])
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [str(tmp_path / "stock"), str((tmp_path / "bin").resolve()),
                                                        "/site/llama_cpp/lib"]


# ------------------------------------------------- stock usage, same prompt ----
def _perf_tokens(stderr: str) -> tuple[int, int]:
    """(prompt-eval tokens, single-token evals) from llama_perf_context_print's lines."""
    import re

    prompt = int(re.search(r"prompt eval time =.*?/\s*(\d+) tokens", stderr).group(1))
    single = int(re.search(r"\n[^\n]*?\beval time =.*?/\s*(\d+) runs", stderr).group(1))
    return prompt, single


def _formatted_prompt(stderr: str) -> str:
    """The prompt llama-mtmd-cli's chat template produced (logged with -v)."""
    start = stderr.index("formatted_chat.prompt: ") + len("formatted_chat.prompt: ")
    return stderr[start:stderr.index("\n<|assistant|>\n", start) + len("\n<|assistant|>\n")]


@requires_tools
def test_stock_mtmd_cli_usage_builds_our_prompt(gguf_7b_f32, square_images):
    """`llama-mtmd-cli -m TEXT --mmproj MMPROJ --image X -p "Q" --temp 0` (no marker in -p: the
    tool prepends one without a newline) renders upstream's prompt through llama.cpp's own
    Jinja engine, evaluates as many prompt tokens as our GGUF backend, and answers with the
    same greedy tokens."""
    from huatuo_lite.generate import run
    from huatuo_lite.llama_tools import MTMD_MARKER, mtmd_cli_run
    from huatuo_lite.prompt import Turn, render

    question, files = QUESTIONS[0], _files(gguf_7b_f32)
    done = mtmd_cli_run(files["text"], files["mmproj"], [square_images[0]], question, N_PREDICT,
                        extra_args=["--repeat-penalty", GREEDY.repetition_penalty])
    assert _formatted_prompt(done.stderr) == render([Turn(question, 1)]).replace("<image>", MTMD_MARKER)
    engine = open_gguf(gguf_7b_f32)  # noqa: F405
    try:
        generation = run(engine, [str(square_images[0])], question, config=GREEDY)
        for _ in generation:
            pass
        answer = generation.answer
        ours = b"".join(engine.token_bytes(t) for t in answer.token_ids).strip()
        eos = set(engine.eos_token_ids) if hasattr(engine, "eos_token_ids") else set()
    finally:
        engine.close()
    prompt_evals, single_evals = _perf_tokens(done.stderr)
    generated = len([t for t in answer.token_ids if t not in eos])
    print({"mtmd_cli": (prompt_evals, single_evals), "ours_prompt": answer.prompt_tokens, "generated": generated})
    # every prompt chunk here is a multi-token batch, so llama.cpp counts them all as prompt eval;
    # answer tokens are decoded one at a time, all but the last when it stops at -n
    assert prompt_evals == answer.prompt_tokens
    assert single_evals == generated - (answer.finish_reason == "length")
    assert done.stdout.strip() == ours


MTMD_HANDLER_SCRIPT = """
import base64, json, sys
from llama_cpp import Llama
from llama_cpp.llama_chat_format import MTMDChatHandler
text, mmproj, n, *pairs = sys.argv[1:]
handler = MTMDChatHandler(clip_model_path=mmproj, verbose=False, use_gpu=False)
llm = Llama(text, chat_handler=handler, n_ctx=2048, n_threads=1, verbose=False)
for image, question in zip(pairs[::2], pairs[1::2]):
    url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
    out = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}],
        max_tokens=int(n), temperature=0.0, top_k=1, repeat_penalty=1.0)
    print(json.dumps({"text": out["choices"][0]["message"]["content"], "usage": out["usage"]}))
"""


@requires_tools
@pytest.mark.skipif(not (DEMO / "gguf").is_dir(), reason="models/demo is not in this checkout")
def test_mtmd_chat_handler_with_the_fixed_library_answers_like_our_backend():
    """llama-cpp-python's own MTMDChatHandler, loading the patched libllama/libmtmd of build/bin
    (LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB), renders the demo GGUF's embedded template, evaluates as
    many prompt tokens as huatuo-lite and answers the demo's first eval questions with the same
    greedy text (penalty off on both sides: llama-cpp-python's also counts prompt tokens,
    upstream's only generated ones). The letters come from a trained model; the image features'
    equality itself is the self-test's (the demo is robust enough that even stock libmtmd, min
    cosine 0.97 on it, gives these six letters)."""
    from huatuo_lite.eval.run import build_prompt
    from huatuo_lite.generate import run

    items = json.loads((DEMO / "eval" / "eval.json").read_text(encoding="utf-8"))[:6]
    pairs = [(str(DEMO / "eval" / item["image"][0]), build_prompt(item["question"], item["options"]))
             for item in items]
    files = _files(DEMO / "gguf")
    done = subprocess.run([sys.executable, "-c", MTMD_HANDLER_SCRIPT, str(files["text"]), str(files["mmproj"]),
                           str(N_PREDICT), *[x for pair in pairs for x in pair]],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=lib_env(native_lib_dir()))
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = [json.loads(line) for line in done.stdout.strip().splitlines()[-len(pairs):]]
    engine = open_gguf(DEMO / "gguf")
    try:
        config = GenerationConfig(temperature=0.0, repetition_penalty=1.0, max_new_tokens=N_PREDICT)
        for (image, question), handler, item in zip(pairs, theirs, items):
            generation = run(engine, [image], question, config=config)
            for _ in generation:
                pass
            answer = generation.answer
            print(item["id"], {"handler": (handler["usage"]["prompt_tokens"], handler["text"]),
                               "ours": (answer.prompt_tokens, answer.text)})
            assert handler["usage"]["prompt_tokens"] == answer.prompt_tokens, item["id"]
            assert handler["text"].strip() == answer.text.strip() != "", item["id"]
    finally:
        engine.close()
