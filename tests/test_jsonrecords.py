"""read_json_object: the config files users hand us (config.json, vit/config.json,
tokenizer_config.json, adapter_config.json) are a JSON object or one sentence."""
from __future__ import annotations

import pytest

from huatuo_lite.errors import HuatuoError, ModelFormatError
from huatuo_lite.jsonrecords import read_json_object


@pytest.mark.parametrize("text, says", [("[1, 2]", "does not hold a JSON object"), ("{not json", "not readable JSON"),
                                        ('"text"', "does not hold a JSON object"), ("[" * 100000, "not readable JSON")])
def test_anything_but_an_object_is_one_sentence(tmp_path, text, says):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ModelFormatError, match=says) as caught:
        read_json_object(path, "re-download it", ModelFormatError)
    assert str(caught.value).endswith("; re-download it.") and "\n" not in str(caught.value)


def test_an_object_is_returned_and_a_missing_file_is_one_sentence(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    assert read_json_object(tmp_path / "a.json", "fix it") == {"x": 1}
    with pytest.raises(HuatuoError, match="not readable JSON .*; fix it."):
        read_json_object(tmp_path / "missing.json", "fix it")


def test_a_vit_config_holding_a_list_is_refused(tmp_path):
    """vit/config.json was read without the object check (a list was an AttributeError traceback)."""
    pytest.importorskip("huatuo_lite.convert.checkpoint.dims")
    from huatuo_lite.convert.checkpoint.dims import VIT_CONFIG, read_vit_config

    path = tmp_path / VIT_CONFIG
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2]")
    with pytest.raises(ModelFormatError, match="does not hold a JSON object; re-download the vit/ folder."):
        read_vit_config(tmp_path)
