"""SIGTERM, SIGHUP, Ctrl-C and SIGKILL at known points of `convert tiny|gguf|onnx`
and `batch`, through the real CLI in a subprocess (tests/support/signal_driver.py pauses
the run at a point and says so on stderr). Each interrupted run must exit
128 + signal with one sentence, leave no `.staging-*`/`.partial-*`, say whether
its output was completed, and the next run into the same folder must succeed.
A full disk (a 256 KB tmpfs in a user namespace) ends in one sentence too."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DRIVER = str((Path(__file__).resolve().parents[1] / "support" / "signal_driver.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HUATUO_LITE_NO_NOTICE": "1", "HF_HUB_OFFLINE": "1"}
CLI = [sys.executable, "-m", "huatuo_lite.cli"]


def leftovers(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.rglob(".*") if ".staging-" in p.name or ".partial-" in p.name
                  or ".old-" in p.name)


def interrupt_at(point: str, args: list, signum=signal.SIGTERM, timeout=120):
    """Run the CLI paused at `point`, send `signum` while paused; (returncode, stderr)."""
    proc = subprocess.Popen([sys.executable, DRIVER, point, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"PAUSED {point}"):
            proc.send_signal(signum)
            break
        if time.monotonic() > deadline:
            break
    rest = proc.communicate(timeout=timeout)[1]
    assert any(line.startswith("PAUSED") for line in seen), "".join(seen)[-2000:]
    return proc.returncode, "".join(seen) + rest


def last_line(stderr: str) -> str:
    """The last line, from its sentence on (a progress bar cut short may precede it on the line)."""
    line = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-1].strip()
    starts = [line.rfind(word) for word in ("Error:", "Interrupted by")]
    return line[max(starts):] if max(starts) > 0 else line


def check_interrupted(case, code, stderr, expected_code, *words):
    line = last_line(stderr)
    print(f"\n{case} | exit {code} | {line}")       # pytest -s shows the sentences seen
    assert code == expected_code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert line.startswith("Interrupted by ") and line.endswith(".") and line.count(". ") == 0, line
    for word in words:
        assert word in line, line
    return line


def run_cli(*args, timeout=180):
    return subprocess.run([*CLI, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout)


def manifest_files(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["files"]


# ------------------------------------------------------------- convert gguf ----
@pytest.mark.slow      # 23-33 s each here: a conversion, a signal, a second conversion
@pytest.mark.parametrize("point", ["gguf-text-written", "gguf-vision"])
def test_sigterm_during_convert_gguf_leaves_nothing_and_rerun_works(point, tiny_7b, tmp_path):
    out = tmp_path / "g"
    code, stderr = interrupt_at(point, ["convert", "gguf", tiny_7b, out, "--quant", "F32"])
    check_interrupted(f"convert gguf, SIGTERM at {point}", code, stderr, 143, "SIGTERM", "nothing was written")
    assert leftovers(out) == [] and (not out.exists() or list(out.iterdir()) == [])
    again = run_cli("convert", "gguf", tiny_7b, out, "--quant", "F32")
    assert again.returncode == 0, again.stderr[-2000:]
    assert leftovers(out) == [] and run_cli("models", "verify", out).returncode == 0


def test_sigterm_in_the_final_moves_completes_the_output_and_says_so(tiny_7b, tmp_path):
    out = tmp_path / "g"
    code, stderr = interrupt_at("final-moves", ["convert", "gguf", tiny_7b, out, "--quant", "F32"])
    check_interrupted("convert gguf, SIGTERM in the final renames", code, stderr, 143, "completed", "whole")
    assert leftovers(out) == []
    files = manifest_files(out)
    assert all((out / name).stat().st_size == entry["size"] for name, entry in files.items())
    verify = run_cli("models", "verify", out)
    assert verify.returncode == 0, verify.stderr


def test_sighup_and_ctrl_c_during_convert_onnx(tiny_7b, tmp_path):
    out = tmp_path / "o"
    code, stderr = interrupt_at("onnx-first-graph", ["convert", "onnx", tiny_7b, out, "--quant", "fp32"],
                                signal.SIGHUP)
    check_interrupted("convert onnx, SIGHUP after the first graph", code, stderr, 129, "SIGHUP", "nothing was written")
    assert leftovers(out) == []
    code, stderr = interrupt_at("onnx-first-graph", ["convert", "onnx", tiny_7b, out, "--quant", "fp32"],
                                signal.SIGINT)
    check_interrupted("convert onnx, Ctrl-C after the first graph", code, stderr, 130, "Ctrl-C")
    assert leftovers(out) == []
    code, stderr = interrupt_at("onnx-first-graph", ["convert", "onnx", tiny_7b, out, "--quant", "fp32"])
    check_interrupted("convert onnx, SIGTERM after the first graph", code, stderr, 143, "SIGTERM")
    assert leftovers(out) == []
    again = run_cli("convert", "onnx", tiny_7b, out, "--quant", "fp32")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "decoder.onnx").is_file() and leftovers(out) == []


# ------------------------------------------------------------- convert tiny ----
@pytest.mark.parametrize("point, words", [("tiny-built", ("nothing was written",)),
                                          ("final-moves", ("completed", "whole"))])
def test_sigterm_during_convert_tiny(point, words, tmp_path):
    out = tmp_path / "tiny"
    code, stderr = interrupt_at(point, ["convert", "tiny", out])
    check_interrupted(f"convert tiny, SIGTERM at {point}", code, stderr, 143, *words)
    assert leftovers(tmp_path) == []
    if point == "tiny-built":
        assert not out.exists()
        again = run_cli("convert", "tiny", out)
        assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()


# ------------------------------------------------------------------ SIGKILL ----
def test_staging_of_a_killed_run_is_removed_by_the_next(tiny_7b, tmp_path):
    out = tmp_path / "g"
    code, stderr = interrupt_at("gguf-vision", ["convert", "gguf", tiny_7b, out, "--quant", "F32"], signal.SIGKILL)
    assert code == -signal.SIGKILL
    stale = leftovers(out)
    assert len(stale) == 1 and stale[0].startswith(".staging-"), stale     # what the kill left
    again = run_cli("convert", "gguf", tiny_7b, out, "--quant", "F32")
    assert again.returncode == 0, again.stderr[-2000:]
    assert leftovers(out) == []


def test_a_live_runs_staging_is_kept(tmp_path):
    from huatuo_lite.fsutil import remove_stale, staging_dir

    with staging_dir(tmp_path) as mine:
        (mine / "x").write_text("x")
        assert remove_stale(tmp_path) == [] and mine.is_dir()         # this process is alive
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        name = mine.name.replace(f"-{os.getpid()}-", f"-{sleeper.pid}-")
        (tmp_path / name).mkdir()
        assert remove_stale(tmp_path) == []                            # its owner is alive
        sleeper.kill()
        sleeper.wait()
        assert remove_stale(tmp_path) == [tmp_path / name]             # its owner is gone
    finally:
        sleeper.kill()


# -------------------------------------------------------------------- batch ----
@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    from huatuo_lite.convert.synth.make import make_synthetic_set

    synth = make_synthetic_set(tmp_path_factory.mktemp("sig-set"), n_train=1, n_val=0, n_test=1, seed=3)
    return synth["test_vqa"]


def test_sigterm_during_batch_keeps_finished_rows_and_resumes(tiny_7b, eval_set, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["batch", eval_set, "-m", tiny_7b, "-b", "torch", "--threads", "1", "-o", out, "--max-tokens", "2",
            "--limit", "3", "--no-progress"]
    code, stderr = interrupt_at("batch-first-row", args)
    check_interrupted("batch, SIGTERM after the first row", code, stderr, 143, "keeps 1 of 3 finished records")
    assert len(out.read_text().splitlines()) == 1 and leftovers(tmp_path) == []
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["already_done"] == 1 and summary["answered"] == 2
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1, 2]


# ---------------------------------------------------------------- full disk ----
def _small_disk_available() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _small_disk_available(), reason="needs unprivileged user namespaces to mount a tmpfs")
@pytest.mark.parametrize("command", ["gguf", "onnx", "tiny", "batch"])
def test_full_disk_is_one_sentence(command, tiny_7b, eval_set, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    args = {"gguf": ["convert", "gguf", tiny_7b, out, "--quant", "F32"],
            "onnx": ["convert", "onnx", tiny_7b, out, "--quant", "fp32"],
            "tiny": ["convert", "tiny", out],
            "batch": ["batch", eval_set, "-m", tiny_7b, "-b", "torch", "--threads", "1", "-o", disk / "o.jsonl",
                      "--max-tokens", "2", "--limit", "2", "--no-progress"]}[command]
    size = "4k" if command == "batch" else "256k"   # batch: one page, taken by its run settings
    # the tmpfs exists only inside the namespace: list what is left there before it goes
    script = (f'mount -t tmpfs -o size={size} none "{disk}" && "$@"; rc=$?; '
              f'find "{disk}" -name ".*staging-*" -o -name ".*partial-*" | sed "s/^/LEFT /"; exit $rc')
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *CLI, *map(str, args)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    line = last_line(result.stderr)
    print(f"\n{command} on a full disk | exit {result.returncode} | {line}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert line.startswith("Error: The disk holding") and "full" in line and line.endswith("."), line
    assert "LEFT" not in result.stdout, result.stdout




NATIVE_WAIT = """
import signal, sys, time
from huatuo_lite import interrupt
interrupt.install()
# The main thread stands for one inside a long native call (a 49 s image encode): with SIGTERM
# masked there, nothing interrupts its sleep and no Python handler can run before it returns.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
print("READY", flush=True)
time.sleep(60)
print("the sleep ended: the watchdog did not act", flush=True)
"""


def test_a_signal_during_a_long_native_call_ends_the_run_after_the_grace(tmp_path):
    from huatuo_lite.interrupt import GRACE_S

    proc = subprocess.Popen([sys.executable, "-c", NATIVE_WAIT], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    waited = time.monotonic() - start
    assert proc.returncode == 143 and "Interrupted by SIGTERM." in err and "did not act" not in out
    assert GRACE_S - 0.5 < waited < GRACE_S + 5
