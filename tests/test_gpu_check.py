"""native/gpu_check.sh's CPU-side parts (it has not run on a GPU here): its argument handling,
the one sentence and exit 1 without nvcc or a GPU, the CPU reference eval, and the report
(native/gpu_report.py) from eval folders, a self-test and llama-bench rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "native" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "native"))

import gpu_report  # noqa: E402


# ------------------------------------------------------------------ the script ----
def run_script(*args, path_dirs=(), **env):
    """The script with PATH = path_dirs + /usr/bin:/bin (no /usr/local/bin, where a CUDA
    compiler may sit) and CUDA_HOME pointing nowhere, unless env says otherwise."""
    environ = {**os.environ, "PATH": os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"]),
               "CUDA_HOME": "/nonexistent-cuda", "PYTHON": sys.executable, **env}
    environ.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env=environ, cwd=ROOT, check=False)


def fake_tools(folder: Path, smi_line: str | None) -> Path:
    """A folder with an `nvcc` and (when smi_line is given) an `nvidia-smi` printing it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\n")
    if smi_line is not None:
        (folder / "nvidia-smi").write_text(f"#!/bin/sh\necho '{smi_line}'\n")
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def test_without_nvcc_one_sentence_exit_1():
    done = run_script()
    assert done.returncode == 1
    assert done.stderr.strip() == ("gpu_check: no CUDA compiler (nvcc) on PATH or in /nonexistent-cuda/bin; "
                                   "run this on a machine with the CUDA toolkit and an NVIDIA GPU.")


def test_nvcc_but_no_gpu_one_sentence_exit_1(tmp_path):
    done = run_script(path_dirs=[fake_tools(tmp_path / "bin", None)])
    assert done.returncode == 1
    assert done.stderr.strip() == ("gpu_check: no NVIDIA GPU is visible (nvidia-smi is missing or lists none); "
                                   "run this on a machine with a CUDA GPU.")


def test_nvidia_smi_listing_no_gpu_counts_as_none(tmp_path):
    done = run_script(path_dirs=[fake_tools(tmp_path / "bin", "")])
    assert done.returncode == 1 and "no NVIDIA GPU is visible" in done.stderr


def test_gpu_without_compute_capability_is_named(tmp_path):
    done = run_script(path_dirs=[fake_tools(tmp_path / "bin", "Some GPU, [N/A], 580.1, 1024 MiB")])
    assert done.returncode == 1
    assert "nvidia-smi gave no compute capability for Some GPU" in done.stderr
    assert "-DCMAKE_CUDA_ARCHITECTURES=NN" in done.stderr


def test_missing_source_archive_names_the_pack_script(tmp_path):
    tools = fake_tools(tmp_path / "bin", "NVIDIA H100 80GB HBM3, 9.0, 580.159.04, 81559 MiB")
    missing = tmp_path / "no-such-src.tar.gz"
    done = run_script(path_dirs=[tools, Path(sys.executable).parent], GPU_CHECK_SRC=str(missing))
    if "cmake is not on PATH" in done.stderr:
        pytest.skip("cmake is not installed here")
    assert done.returncode == 1
    assert done.stderr.strip() == (f"gpu_check: {missing} is missing; run native/pack_llama_src.sh and name "
                                   f".gpu/{missing.name} in the device call's carry list.")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, sentence", [
    (["--bogus"], "gpu_check: unknown argument '--bogus'; see native/gpu_check.sh --help."),
    (["--jobs", "0"], "gpu_check: --jobs must be a whole number above 0, not '0'."),
    (["--limit", "x"], "gpu_check: --limit must be a whole number above 0, not 'x'."),
    (["--out"], "gpu_check: --out needs a value; see native/gpu_check.sh --help."),
])
def test_bad_arguments_exit_2(args, sentence):
    done = run_script(*args)
    assert done.returncode == 2
    assert done.stderr.strip() == sentence


def test_help_describes_usage():
    done = run_script("--help")
    assert done.returncode == 0
    assert "native/gpu_check.sh --cpu-reference DIR" in done.stdout and "--gpu-layers -1" in done.stdout


def test_cpu_reference_runs_the_demo_eval(tmp_path):
    out = tmp_path / "ref"
    done = run_script("--cpu-reference", str(out), "--limit", "5")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(5))
    report = json.loads((out / "report.json").read_text())
    assert report["total"]["count"] == 5 and report["backend"] == "gguf"
    assert "Accuracy" in done.stderr


def test_eval_help_has_gpu_layers():
    done = subprocess.run([sys.executable, "-m", "huatuo_lite.cli", "eval", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0 and "--gpu-layers" in done.stdout


# ------------------------------------------------------------------ the report ----
def write_eval(folder: Path, letters: str, answers: str) -> Path:
    """A fake eval folder: question i answered letters[i], correct answer answers[i]."""
    folder.mkdir(parents=True)
    rows = [{"index": i, "key": f"k{i}", "dataset": "d", "subset": None, "n_options": 4, "answer": a,
             "output": letter, "letter": letter, "parsed": True, "correct": letter == a}
            for i, (letter, a) in enumerate(zip(letters, answers))]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "report.json").write_text(json.dumps({"backend": "gguf"}))
    return folder


ANSWERS = "ABCD" * 50      # 200 questions


def test_identical_runs_pass(tmp_path):
    cpu = write_eval(tmp_path / "cpu", ANSWERS[:150] + "A" * 50, ANSWERS)
    gpu = write_eval(tmp_path / "gpu", ANSWERS[:150] + "A" * 50, ANSWERS)
    report = gpu_report.build_report([("cpu", gpu_report.load_eval(cpu)), ("gpu", gpu_report.load_eval(gpu))])
    row = report["evals"][1]
    expected = sum(a == b for a, b in zip(ANSWERS[:150] + "A" * 50, ANSWERS)) / 200
    assert row["accuracy"] == row["accuracy_reference"] == expected
    assert row["agreement"] == 1.0 and row["delta_points"] == 0.0 and row["disagreements"] == []
    assert report["passed"] and report["failures"] == []


def test_two_swapped_answers_keep_accuracy_and_agreement_99(tmp_path):
    """One question turns wrong and another right: accuracy equal, agreement 198/200 = 99%."""
    gpu_letters = "D" + ANSWERS[1:151] + "A" * 49     # q0 right -> wrong, q150 wrong ("A") -> right
    cpu = gpu_report.load_eval(write_eval(tmp_path / "cpu", ANSWERS[:150] + "A" * 50, ANSWERS))
    gpu = gpu_report.load_eval(write_eval(tmp_path / "gpu", gpu_letters, ANSWERS))
    row = gpu_report.compare(cpu["rows"], gpu["rows"])
    assert row["delta_points"] == 0.0 and row["agreement"] == 0.99 and row["disagreements"] == [0, 150]
    assert gpu_report.eval_verdict(row) == []


def test_one_flipped_answer_of_298_fails_the_accuracy_limit(tmp_path):
    """On the demo's 298 questions one lost answer is 0.34 points, over the 0.3 limit."""
    answers = ("ABCD" * 75)[:298]
    cpu = gpu_report.load_eval(write_eval(tmp_path / "cpu", answers, answers))
    gpu = gpu_report.load_eval(write_eval(tmp_path / "gpu", "D" + answers[1:], answers))
    row = gpu_report.compare(cpu["rows"], gpu["rows"])
    assert row["delta_points"] == pytest.approx(-100 / 298)
    reasons = gpu_report.eval_verdict(row)
    assert reasons == ["accuracy differs by -0.34 points (limit 0.3)"]


def test_low_agreement_and_missing_questions_fail(tmp_path):
    cpu = gpu_report.load_eval(write_eval(tmp_path / "cpu", ANSWERS, ANSWERS))
    gpu = gpu_report.load_eval(write_eval(tmp_path / "gpu", "BCDA" * 25, ANSWERS[:100]))
    reasons = gpu_report.eval_verdict(gpu_report.compare(cpu["rows"], gpu["rows"]))
    assert "answered 100 questions, the reference 200" in reasons
    assert any(r.startswith("agreement 0.0% < 99%") for r in reasons)


def test_torn_last_line_is_skipped(tmp_path):
    folder = write_eval(tmp_path / "cpu", "AB", "AB")
    with open(folder / "results.jsonl", "a") as fh:
        fh.write('{"index": 2, "corr')
    assert sorted(gpu_report.load_eval(folder)["rows"]) == [0, 1]


def test_bench_table_pairs_cpu_and_gpu():
    rows = [{"devices": "none", "n_prompt": 512, "n_gen": 0, "avg_ts": 2000.0, "stddev_ts": 10.0, "n_threads": 16},
            {"devices": "none", "n_prompt": 0, "n_gen": 128, "avg_ts": 400.0, "stddev_ts": 4.0, "n_threads": 16},
            {"devices": "CUDA0", "n_prompt": 512, "n_gen": 0, "avg_ts": 50000.0, "stddev_ts": 500.0},
            {"devices": "CUDA0", "n_prompt": 0, "n_gen": 128, "avg_ts": 1000.0, "stddev_ts": 8.0}]
    table = {entry["test"]: entry for entry in gpu_report.bench_table(rows)}
    assert table["pp512"]["gpu_over_cpu"] == 25.0 and table["tg128"]["gpu_over_cpu"] == 2.5
    assert table["pp512"]["cpu"]["threads"] == 16 and table["tg128"]["gpu"]["devices"] == "CUDA0"


SELFTEST_OK = {"threshold": 0.999, "passed": True, "gpu_vs_cpu_min_cosine": 0.99999,
               "cpu": {"passed": True, "min_cosine": 0.99998, "mean_cosine": 0.99999, "backend": "CPU"},
               "gpu": {"passed": True, "min_cosine": 0.99997, "mean_cosine": 0.99999, "backend": "CUDA0"}}


def test_selftest_on_cpu_backend_fails_the_check(tmp_path):
    cpu = gpu_report.load_eval(write_eval(tmp_path / "cpu", ANSWERS, ANSWERS))
    fell_back = {**SELFTEST_OK, "gpu": {**SELFTEST_OK["gpu"], "backend": "CPU"}}
    report = gpu_report.build_report([("cpu", cpu), ("gpu", cpu)], selftest=fell_back)
    assert report["failures"] == ["libmtmd's CLIP ran on CPU, not the GPU"] and not report["passed"]
    report = gpu_report.build_report([("cpu", cpu), ("gpu", cpu)], selftest=SELFTEST_OK,
                                     bench=[{"devices": "none", "n_prompt": 512, "n_gen": 0, "avg_ts": 1.0}])
    assert report["failures"] == ["llama-bench measured no GPU test"]


def test_cli_writes_markdown_and_json_and_exit_codes(tmp_path):
    cpu = write_eval(tmp_path / "cpu", ANSWERS, ANSWERS)
    gpu = write_eval(tmp_path / "gpu", ANSWERS, ANSWERS)
    (tmp_path / "selftest.json").write_text(json.dumps(SELFTEST_OK))
    (tmp_path / "bench.jsonl").write_text(
        "noise line\n" + json.dumps({"devices": "none", "n_prompt": 512, "n_gen": 0, "avg_ts": 100.0}) + "\n"
        + json.dumps({"devices": "CUDA0", "n_prompt": 512, "n_gen": 0, "avg_ts": 900.0}) + "\n")
    (tmp_path / "timings.txt").write_text("build 300\neval-gpu 12\n")
    args = ["--eval", f"cpu={cpu}", "--eval", f"gpu={gpu}", "--selftest", str(tmp_path / "selftest.json"),
            "--bench", str(tmp_path / "bench.jsonl"), "--timings", str(tmp_path / "timings.txt"),
            "--fact", "device=NVIDIA H100", "--md", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]
    assert gpu_report.main(args) == 0
    md = (tmp_path / "r.md").read_text()
    assert "**PASSED**" in md and "- device: NVIDIA H100" in md
    assert "| pp512 | 100.0 ± 0.0 | 900.0 ± 0.0 | 9.00x |" in md
    assert "| gpu | 200 | 100.0 | +0.00 | 100.0 | none |" in md
    assert json.loads((tmp_path / "r.json").read_text())["timings_s"] == {"build": 300.0, "eval-gpu": 12.0}
    write_eval(tmp_path / "bad", "B" * 200, ANSWERS)
    assert gpu_report.main(["--eval", f"cpu={cpu}", "--eval", f"gpu={tmp_path / 'bad'}"]) == 1


@pytest.mark.parametrize("make_args, sentence", [
    (lambda d: ["--eval", f"cpu={d}"], "give at least two --eval NAME=DIR runs"),
    (lambda d: ["--eval", f"cpu={d}", "--eval", "gpu"], "--eval 'gpu' is not NAME=VALUE"),
    (lambda d: ["--eval", f"cpu={d}", "--eval", f"gpu={d / 'nope'}"], "holds no results.jsonl"),
    (lambda d: ["--eval", f"cpu={d}", "--eval", f"gpu={d}", "--selftest", str(d / "list.json")],
     "list.json holds no JSON object; run native/gpu_selftest.py --json again."),
])
def test_cli_bad_input_one_sentence_exit_2(tmp_path, capsys, make_args, sentence):
    folder = write_eval(tmp_path / "cpu", ANSWERS, ANSWERS)
    (folder / "list.json").write_text("[1, 2]")      # valid JSON, but no object
    code = gpu_report.main(make_args(folder))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("gpu_report: ") and err.count("\n") == 0
    assert sentence in err


def test_real_cpu_eval_compared_with_itself(tmp_path):
    """The script's CPU reference on the demo (5 questions) read back by the report."""
    out = tmp_path / "ref"
    assert run_script("--cpu-reference", str(out), "--limit", "5").returncode == 0
    run = gpu_report.load_eval(out)
    report = gpu_report.build_report([("cpu", run), ("again", run)])
    assert report["passed"] and report["evals"][1]["shared"] == 5
    assert report["evals"][0]["accuracy"] == json.loads((out / "report.json").read_text())["total"]["accuracy"]
