"""Property tests: the manifest reader and the batch record reader take any
bytes or any JSON, and either load them or raise HuatuoError with one sentence
(one line, ending in a full stop); nothing else escapes.

The default profile is fast (tens of examples); `pytest --long` runs
the `slow` variants with thousands."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from huatuo_lite.batch.run import read_done
from huatuo_lite.batch.records import load_batch_items
from huatuo_lite.errors import HuatuoError
from huatuo_lite.manifest import MANIFEST_NAME, check_sizes, files_with_role, read_manifest

LONG = os.environ.get("HUATUO_LITE_LONG") == "1"          # set by `pytest --long`
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=3000 if LONG else 200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
FIELDS = ["image", "images", "conversations", "question", "options", "answer", "id", "from", "value", "format",
          "files", "size", "sha256", "role"]
# records that look like the real ones: known keys with values of any type
record_like = st.dictionaries(st.sampled_from(FIELDS), json_values | st.lists(
    st.dictionaries(st.sampled_from(["from", "value"]), json_values | st.sampled_from(["human", "gpt"])),
    max_size=3), max_size=6)
manifest_like = st.fixed_dictionaries({}, optional={
    "format": json_values | st.sampled_from(["gguf", "onnx"]),
    "files": json_values | st.dictionaries(st.text(max_size=10) | st.sampled_from(["a.gguf", "../x", "/etc/x"]),
                                           st.fixed_dictionaries({}, optional={
                                               "size": json_values, "sha256": json_values,
                                               "role": json_values | st.just("text")}), max_size=3)})


def one_sentence(err: HuatuoError) -> None:
    text = str(err)
    assert text and "\n" not in text and text.endswith("."), text


def check_manifest(folder, payload: bytes) -> None:
    (folder / MANIFEST_NAME).write_bytes(payload)
    try:
        manifest = read_manifest(folder)
        files_with_role(folder, manifest, "text")
        check_sizes(folder, manifest)
    except HuatuoError as err:
        one_sentence(err)


def check_records(folder, payload: bytes) -> None:
    path = folder / "data.json"
    path.write_bytes(payload)
    try:
        items = load_batch_items(path)
    except HuatuoError as err:
        one_sentence(err)
        return
    assert all(isinstance(item.prompt, str) and all(isinstance(p, str) for p in item.images) for item in items)


def check_results(folder, payload: bytes) -> None:
    out = folder / "out.jsonl"
    out.write_bytes(payload)
    try:
        read_done(out, [])
    except HuatuoError as err:
        one_sentence(err)


def as_json(value) -> bytes:
    return json.dumps(value).encode()


# ---------------------------------------------------------------- manifest ----
@FAST
@given(manifest_like | json_values)
def test_any_manifest_json_loads_or_is_one_sentence(tmp_path, value):
    check_manifest(tmp_path, as_json(value))


@FAST
@given(st.binary(max_size=200))
def test_any_manifest_bytes_load_or_are_one_sentence(tmp_path, payload):
    check_manifest(tmp_path, payload)


# ----------------------------------------------------------- batch records ----
@FAST
@given(st.lists(record_like, max_size=4) | json_values)
def test_any_batch_records_load_or_are_one_sentence(tmp_path, value):
    check_records(tmp_path, as_json(value))


@FAST
@given(st.binary(max_size=200))
def test_any_batch_file_bytes_load_or_are_one_sentence(tmp_path, payload):
    check_records(tmp_path, payload)


@FAST
@given(st.lists(json_values | record_like, max_size=4))
def test_any_results_file_loads_or_is_one_sentence(tmp_path, rows):
    check_results(tmp_path, b"".join(as_json(r) + b"\n" for r in rows))


def test_known_bad_shapes_are_one_sentence(tmp_path):
    """The cases the issue names, each checked by hand (hypothesis may not draw them)."""
    for value in ({"format": "gguf"}, [], [{"files": {}}], {"format": "gguf", "files": {"../../etc/passwd":
                  {"size": 1, "sha256": "x", "role": "text"}}}):
        (tmp_path / MANIFEST_NAME).write_text(json.dumps(value))
        with pytest.raises(HuatuoError) as err:
            read_manifest(tmp_path)
        one_sentence(err.value)
    for record in ({"image": 5, "question": "Q?"}, {"conversations": 7}, {"question": 3},
                   {"image": [None], "question": "Q?"}, {"options": "[" * 200, "question": "Q"}):
        (tmp_path / "data.json").write_text(json.dumps([record]))
        with pytest.raises(HuatuoError) as err:
            load_batch_items(tmp_path / "data.json")
        one_sentence(err.value)


# ----------------------------------------------------------------- longer ----
@pytest.mark.long
@SLOW
@given(manifest_like | json_values | st.binary(max_size=400))
def test_long_manifest_fuzz(tmp_path, value):
    check_manifest(tmp_path, value if isinstance(value, bytes) else as_json(value))


@pytest.mark.long
@SLOW
@given(st.lists(record_like, max_size=8) | json_values | st.binary(max_size=400))
def test_long_batch_records_fuzz(tmp_path, value):
    check_records(tmp_path, value if isinstance(value, bytes) else as_json(value))
    check_results(tmp_path, value if isinstance(value, bytes) else as_json(value) + b"\n")
