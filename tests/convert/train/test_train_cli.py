"""`huatuo-lite train ...` and `huatuo-lite train merge ...` end to end on a tiny model."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
from click.testing import CliRunner  # noqa: E402

from support.train_set import make_dataset  # noqa: E402

from huatuo_lite.cli.main import cli  # noqa: E402


@pytest.fixture(scope="module")
def data_with_bad_record(tmp_path_factory):
    path = make_dataset(tmp_path_factory.mktemp("cli-data"), follow_up=True)
    records = json.loads(path.read_text())
    records.append({**records[0], "image": ["images/missing.png"]})      # record 4
    path.write_text(json.dumps(records))
    return path


def _run(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


def test_bad_record_is_refused_with_its_index(data_with_bad_record, tiny_7b, tmp_path):
    result = _run(data_with_bad_record, "--model", tiny_7b, "--out", tmp_path / "out", "--mode", "align",
                  "--max-steps", 1, "--no-progress")
    assert result.exit_code == 1
    assert "Record 4 of" in result.output and "missing.png does not exist" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "config.json").exists()


def test_train_skips_bad_records_then_merge_writes_a_model(data_with_bad_record, tiny_7b, tmp_path):
    from huatuo_lite.convert.checkpoint.read import open_checkpoint

    out = tmp_path / "adapter"
    result = _run(data_with_bad_record, "--model", tiny_7b, "--out", out, "--mode", "lora", "--max-steps", 2,
                  "--lora-r", 4, "--bad-records", "skip", "--val-split", 0.25, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "Skipped record 4: its image" in result.stderr
    assert "validation loss" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == 2 and log["val_loss"] > 0 and log["skipped"][0].startswith("record 4")
    merged = _run("merge", out, "--model", tiny_7b, "--out", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    assert open_checkpoint(tmp_path / "merged").variant.name == "7b"


def test_merge_refuses_a_folder_that_is_not_an_adapter(tiny_7b, tmp_path):
    result = _run("merge", tiny_7b, "--model", tiny_7b, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "is not a LoRA adapter folder" in result.output


def test_help_lists_the_modes_and_merge():
    assert "merge" in _run("--help").output
    assert "qlora" in _run("run", "--help").output
