"""Running an eval: resumable without duplicates, and end to end on a tiny
torch model with the CLI (a random model: the report's shape and counts)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import huatuo_lite.eval.run as evaluate
from huatuo_lite.errors import HuatuoError
from huatuo_lite.eval.report import summarize
from huatuo_lite.eval.run import RESULTS_NAME, evaluate_items, load_items


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    from huatuo_lite.convert.synth.make import make_synthetic_set

    return make_synthetic_set(tmp_path_factory.mktemp("eval-set"), n_train=0, n_val=0, n_test=4, seed=3)


def _fake_answerer(stop_after=None):
    """Answers "B" or "no idea" by item; raises KeyboardInterrupt after stop_after answers."""
    calls = []

    def answer(item):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(item.index)
        return {"output": "B" if item.index % 3 else "no idea"}

    answer.calls = calls
    return answer


def _lines(folder):
    return [json.loads(line) for line in (folder / RESULTS_NAME).read_text(encoding="utf-8").splitlines()]


def test_interrupted_run_resumes_to_the_same_report(synth_set, tmp_path):
    items, skipped = load_items(synth_set["test_vqa"])
    whole = summarize(evaluate_items(items, _fake_answerer(), tmp_path / "whole", progress=False), skipped, {})

    folder = tmp_path / "resumed"
    folder.mkdir()
    with pytest.raises(KeyboardInterrupt):
        evaluate_items(items, _fake_answerer(stop_after=5), folder, progress=False)
    assert len(_lines(folder)) == 5
    with open(folder / RESULTS_NAME, "a", encoding="utf-8") as fh:
        fh.write('{"index": 5, "key": "torn wri')          # killed mid-line
    second = _fake_answerer()
    rows = evaluate_items(items, second, folder, progress=False)
    assert second.calls == [i.index for i in items[5:]]      # done items are not asked again
    assert summarize(rows, skipped, {}) == whole
    assert [r["index"] for r in rows] == [i.index for i in items]
    kept = []
    for line in (folder / RESULTS_NAME).read_text(encoding="utf-8").splitlines():
        try:
            kept.append(json.loads(line)["index"])
        except ValueError:
            assert line.startswith('{"index": 5, "key": "torn')   # only the torn line is unreadable
    assert sorted(kept) == [i.index for i in items]               # each item once, none lost
    again = _fake_answerer()
    evaluate_items(items, again, folder, progress=False)
    assert again.calls == []


def test_results_of_another_eval_file_are_refused(synth_set, tmp_path):
    items, _ = load_items(synth_set["test_vqa"])
    evaluate_items(items[:2], _fake_answerer(), tmp_path, progress=False)
    lines = _lines(tmp_path)
    lines[0]["key"] = "0000"
    (tmp_path / RESULTS_NAME).write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    with pytest.raises(HuatuoError, match="another eval file"):
        evaluate_items(items, _fake_answerer(), tmp_path, progress=False)


# ------------------------------------------------------- tiny torch model ----
def test_tiny_model_end_to_end_with_resume(tiny_7b, synth_set, tmp_path, monkeypatch):
    data = synth_set["test_vqa"]
    whole = evaluate.run_eval(tiny_7b, data, tmp_path / "whole", limit=4, progress=False)
    assert whole["total"]["count"] == 4 and whole["backend"] == "torch"
    assert 0.0 <= whole["total"]["accuracy"] <= 1.0
    assert whole["total"]["unparsed"] <= 4 and 0.2 <= whole["total"]["chance"] <= 0.5
    assert sum(g["count"] for g in whole["datasets"].values()) == 4
    assert (tmp_path / "whole" / "report.md").read_text(encoding="utf-8").startswith("# Eval")

    real = evaluate.model_answerer

    def stopping(*args, **kwargs):
        answer, seen = real(*args, **kwargs), []

        def wrapped(item):
            if len(seen) == 2:
                raise KeyboardInterrupt
            seen.append(item)
            return answer(item)
        return wrapped

    monkeypatch.setattr(evaluate, "model_answerer", stopping)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_eval(tiny_7b, data, tmp_path / "resumed", limit=4, progress=False)
    monkeypatch.setattr(evaluate, "model_answerer", real)
    resumed = evaluate.run_eval(tiny_7b, data, tmp_path / "resumed", limit=4, progress=False)
    assert len(_lines(tmp_path / "resumed")) == 4
    assert {k: resumed[k] for k in ("total", "datasets", "subsets")} == \
        {k: whole[k] for k in ("total", "datasets", "subsets")}
    with pytest.raises(HuatuoError, match="other settings"):
        evaluate.run_eval(tiny_7b, data, tmp_path / "resumed", limit=4, progress=False, max_new_tokens=3)


@pytest.mark.parametrize("edit, says", [
    ('[1, 2]\n', "not a result row"),                        # JSON, but not a row
    ('{"index": "0", "key": "x"}\n', "not a result row"),     # index of the wrong type
    ('not json at all\n', "not JSON"),
    (b'\xff\xfe{"index": 0}\n', "not UTF-8"),
])
def test_hand_edited_results_are_one_sentence(synth_set, tmp_path, edit, says):
    items, _ = load_items(synth_set["test_vqa"])
    path = tmp_path / RESULTS_NAME
    (path.write_bytes if isinstance(edit, bytes) else path.write_text)(edit)
    with pytest.raises(HuatuoError, match=says):
        evaluate_items(items, _fake_answerer(), tmp_path, progress=False)


@pytest.mark.parametrize("settings", ["[1, 2]", "{not json", "\"a string\""])
def test_hand_edited_run_settings_are_one_sentence(tmp_path, settings):
    (tmp_path / evaluate.RUN_NAME).write_text(settings)
    with pytest.raises(HuatuoError, match="not a JSON object"):
        evaluate.check_run(tmp_path, {"model": "m"})


def test_cli_eval_writes_both_reports(tiny_7b, synth_set, tmp_path):
    from huatuo_lite.cli.main import cli

    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["eval", str(synth_set["test_vqa"]), "-m", str(tiny_7b), "--limit", "2",
                                      "-o", str(out), "--no-progress", "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["total"]["count"] == 2 and report["max_new_tokens"] == 4
    assert "Accuracy" in result.output
    missing = CliRunner().invoke(cli, ["eval", str(tmp_path / "nope.json"), "-m", str(tiny_7b)])
    assert missing.exit_code == 1 and "No eval file" in missing.output
