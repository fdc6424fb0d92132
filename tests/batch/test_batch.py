"""`huatuo-lite batch`: record formats, the results file (order, torn lines,
resume), the local worker pool, and Ray Data in local mode (same answers as
`eval`; a run killed half-way resumes without losing or repeating a record)."""
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

import huatuo_lite.api as api
from huatuo_lite.batch.run import OrderedWriter, read_done, run_batch
from huatuo_lite.batch.records import load_batch_items
from huatuo_lite.errors import HuatuoError
from huatuo_lite.eval.run import load_items

ONE_THREAD = {"threads": 1}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """12 eval records (3 cases) and PubMedVision conversations, with images."""
    from huatuo_lite.convert.synth.make import make_synthetic_set

    return make_synthetic_set(tmp_path_factory.mktemp("batch-set"), n_train=1, n_val=0, n_test=3, seed=5)


@pytest.fixture(scope="module")
def pubmedvision(synth, tmp_path_factory):
    """3 conversations and one whose image is missing (index 1)."""
    records = json.loads(synth["train_conversations"].read_text(encoding="utf-8"))[:3]
    broken = {**records[0], "id": "broken", "image": ["images/not-yet.png"]}
    path = synth["root"] / "pmv.json"
    path.write_text(json.dumps([records[0], broken, *records[1:]]), encoding="utf-8")
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------- records ----
def test_eval_records_get_the_eval_prompt(synth):
    items = load_batch_items(synth["test_vqa"])
    eval_items, _ = load_items(synth["test_vqa"])
    assert len(items) == len(eval_items) == 12
    assert [(i.index, i.prompt, i.images) for i in items] == [(e.index, e.prompt, e.images) for e in eval_items]
    assert [i.extra["answer"] for i in items] == [e.answer_letter for e in eval_items]
    assert {i.kind for i in items} == {"eval"}


def test_pubmedvision_records_ask_the_first_human_turn(pubmedvision):
    records = json.loads(pubmedvision.read_text(encoding="utf-8"))
    items = load_batch_items(pubmedvision)
    assert [i.prompt for i in items] == [r["conversations"][0]["value"] for r in records]
    assert items[0].extra["reference"] == records[0]["conversations"][1]["value"]
    assert items[1].images == (str(pubmedvision.parent / "images" / "not-yet.png"),)
    assert {i.kind for i in items} == {"conversation"}


def test_records_without_a_question_are_refused(tmp_path):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"image": ["a.png"], "answer": "x"}]))
    with pytest.raises(HuatuoError, match="record 0 has no question"):
        load_batch_items(data)


# ---------------------------------------------------------- results file ----
def test_a_torn_last_line_is_cut_before_appending(synth, tmp_path):
    items = load_batch_items(synth["test_vqa"])
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "key": items[0].key, "output": "A"}) + "\n"
                   + '{"index": 1, "key": "' + items[1].key[:5])
    assert list(read_done(out, items)) == [0]
    assert out.read_text().count("\n") == 1 and out.read_text().endswith("\n")
    out.write_text(json.dumps({"index": 0, "key": "0123456789abcdef", "output": "A"}) + "\n")
    with pytest.raises(HuatuoError, match="another dataset"):
        read_done(out, items)


def test_rows_are_written_in_record_order(tmp_path):
    written = []
    with open(tmp_path / "o.jsonl", "w") as handle:
        writer = OrderedWriter(handle, [2, 5, 7], written.append)
        for index in (7, 2, 5):
            writer.add({"index": index})
    assert [r["index"] for r in written] == [2, 5, 7]
    assert [r["index"] for r in rows(tmp_path / "o.jsonl")] == [2, 5, 7]


# ----------------------------------------------------------- local runs ----
@pytest.fixture(scope="module")
def model(tiny_7b):
    with api.load(tiny_7b, backend="torch") as hv:
        yield hv


def test_local_batch_equals_ask_and_retries_failed_records(tiny_7b, model, pubmedvision, tmp_path):
    out = tmp_path / "pmv.jsonl"
    summary = run_batch(pubmedvision, tiny_7b, out, backend="torch", max_tokens=5, load_options=ONE_THREAD,
                        progress=False)
    assert summary == {"records": 4, "already_done": 0, "answered": 3, "errors": 1, "out": str(out)}
    first = rows(out)
    assert [r["index"] for r in first] == [0, 1, 2, 3] and "not-yet.png" in first[1]["error"]
    for row, item in zip(first, load_batch_items(pubmedvision)):
        if item.index != 1:
            assert row["output"] == model.ask(list(item.images), item.prompt, temperature=0, max_new_tokens=5).text

    shutil.copy(load_batch_items(pubmedvision)[0].images[0], pubmedvision.parent / "images" / "not-yet.png")
    again = run_batch(pubmedvision, tiny_7b, out, backend="torch", max_tokens=5, load_options=ONE_THREAD,
                      progress=False)
    assert again["already_done"] == 3 and again["answered"] == 1 and again["errors"] == 0
    final = rows(out)
    assert [r["index"] for r in final] == [0, 1, 2, 3] and "error" not in final[1]
    assert final[1]["output"] == first[0]["output"]          # same image, same question as record 0
    with pytest.raises(HuatuoError, match="other settings"):
        run_batch(pubmedvision, tiny_7b, out, backend="torch", max_tokens=6, progress=False)


@pytest.mark.slow
def test_two_pool_workers_write_what_one_writes(tiny_7b, synth, tmp_path):
    common = dict(backend="torch", max_tokens=4, load_options=ONE_THREAD, limit=5, progress=False)
    run_batch(synth["test_vqa"], tiny_7b, tmp_path / "one.jsonl", workers=1, **common)
    run_batch(synth["test_vqa"], tiny_7b, tmp_path / "two.jsonl", workers=2, **common)
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    assert len(rows(tmp_path / "two.jsonl")) == 5


# ------------------------------------------------------------ Ray (local) ----
@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module (starting Ray takes ~10 s)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def eval_rows(tiny_7b, synth, tmp_path_factory):
    from huatuo_lite.eval.run import RESULTS_NAME, run_eval

    out = tmp_path_factory.mktemp("eval")
    run_eval(tiny_7b, synth["test_vqa"], out, backend="torch", load_options=ONE_THREAD, progress=False)
    return {row["index"]: row for row in rows(out / RESULTS_NAME)}


@pytest.mark.slow
def test_ray_batch_gives_the_eval_answers(ray_address, eval_rows, tiny_7b, synth, tmp_path):
    out = tmp_path / "ray.jsonl"
    summary = run_batch(synth["test_vqa"], tiny_7b, out, backend="torch", ray_address=ray_address, workers=2,
                        load_options=ONE_THREAD, progress=False)
    assert summary["answered"] == 12 and summary["errors"] == 0
    got = rows(out)
    assert [r["index"] for r in got] == sorted(eval_rows)
    assert [(r["output"], r["letter"], r["correct"]) for r in got] == \
        [(e["output"], e["letter"], e["correct"]) for e in eval_rows.values()]


def batch_command(data, model, out, address):
    return [sys.executable, "-m", "huatuo_lite.cli", "batch", str(data), "-m", str(model), "-b", "torch",
            "--threads", "1", "-o", str(out), "--ray", address, "--workers", "1", "--no-progress"]


@pytest.mark.slow
def test_ray_batch_killed_half_way_resumes(ray_address, eval_rows, tiny_7b, synth, tmp_path):
    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HUATUO_LITE_NO_NOTICE": "1"}
    command = batch_command(synth["test_vqa"], tiny_7b, out, ray_address)
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and first.poll() is None:
        if out.is_file() and out.read_bytes().count(b"\n") >= 4:
            os.kill(first.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    first.wait(30)
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    survived = out.read_bytes()
    kept = survived[:survived.rfind(b"\n") + 1].decode().splitlines()
    assert 4 <= len(kept) < 12

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["already_done"] == len(kept) and summary["answered"] == 12 - len(kept)
    final = out.read_text().splitlines()
    assert final[:len(kept)] == kept                        # resumed by appending, nothing redone
    assert [json.loads(line)["index"] for line in final] == list(range(12))
    assert [json.loads(line)["output"] for line in final] == [eval_rows[i]["output"] for i in range(12)]


def test_cli_batch_exits_1_when_a_record_failed_and_keeps_the_file_complete(tiny_7b, pubmedvision, tmp_path):
    from click.testing import CliRunner

    from huatuo_lite.cli.main import cli

    out = tmp_path / "cli.jsonl"
    records = json.loads(pubmedvision.read_text(encoding="utf-8"))
    data = tmp_path / "two.json"       # record 1's image is missing
    data.write_text(json.dumps([{**records[0], "image": [str(pubmedvision.parent / p) for p in records[0]["image"]]},
                                {**records[1], "image": ["/nonexistent/not-there.png"]}]), encoding="utf-8")
    result = CliRunner().invoke(cli, ["batch", str(data), "-m", str(tiny_7b), "-b", "torch", "--threads", "1",
                                      "-o", str(out), "--max-tokens", "2", "--no-progress"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    summary = json.loads(next(line for line in lines if line.startswith("{")))
    assert summary["errors"] == 1 and summary["answered"] == 1
    assert lines[-1] == f"Error: 1 of 2 records failed; their rows in {out} give the reason (run the same command again to retry them)."
    assert [r["index"] for r in rows(out)] == [0, 1] and rows(out)[1]["error"]
