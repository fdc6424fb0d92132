"""The formats registry (huatuo_lite/formats.py): its invariants, the tables derived
from it and used in place of the old hand-written ones, and agreement with the
converters' own quant tables and the manifests they write (so it cannot drift)."""
from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from huatuo_lite import backends, formats, store
from huatuo_lite.cli.convert import convert as convert_group
from huatuo_lite.errors import HuatuoError, ModelFormatError
from huatuo_lite.eval import fidelity
from huatuo_lite.formats import FORMATS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
CONVERTERS = {"gguf": "huatuo_lite.convert.gguf.export", "onnx": "huatuo_lite.convert.onnx.export"}


# ------------------------------------------------------------- invariants ----
def test_every_entry_is_filed_under_its_name_and_names_are_unique():
    assert all(key == f.name for key, f in FORMATS.items())
    for field in ("name", "backend", "module", "spec"):
        values = [getattr(f, field) for f in FORMATS.values()]
        assert len(set(values)) == len(values), field


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)
def test_defaults_are_among_the_choices(fmt):
    assert (fmt.default_quant in fmt.quants) if fmt.quants else fmt.default_quant is None
    assert (fmt.default_side_quant in fmt.side_quants) if fmt.side_quants else fmt.default_side_quant is None
    assert len(set(fmt.quants)) == len(fmt.quants) and len(set(fmt.side_quants)) == len(fmt.side_quants)
    assert not fmt.load_quant or fmt.quants          # picking a quant needs quants to pick from
    assert bool(fmt.roles) == bool(fmt.quants)       # a converted format writes files; upstream is read as is


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)
def test_each_backend_module_imports_by_name_and_opens_engines(fmt):
    if fmt.module.startswith("huatuo_lite.convert."):
        pytest.importorskip("torch")                 # the heavy side: only with the convert extra
    module = importlib.import_module(fmt.module)
    assert callable(module.open_engine)
    assert backends.load_backend(fmt.backend).module is module


def test_the_registry_imports_nothing_from_the_package_and_nothing_heavy():
    tree = ast.parse((ROOT / "huatuo_lite" / "formats.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "dataclasses", "typing"}
    code = "import sys, huatuo_lite.formats; print(sorted({'torch', 'numpy', 'llama_cpp', 'onnxruntime'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# ----------------------------------------------------------- derived tables ----
def test_derived_tables_equal_the_hand_written_ones_they_replace():
    # the tables as they stood before the registry (backends/__init__, store, eval/fidelity)
    assert formats.BACKEND_MODULES == {"torch": "huatuo_lite.convert.reference.engine",
                                       "gguf": "huatuo_lite.backends.gguf", "onnx": "huatuo_lite.backends.onnx"}
    assert formats.FORMAT_BACKEND == {"gguf": "gguf", "onnx": "onnx", "upstream": "torch"}
    assert formats.SPEC_BACKEND == {"reference": "torch", "gguf": "gguf", "onnx": "onnx"}
    assert {b: options("Q8_0") for b, options in formats.QUANT_OPTIONS.items()} == {
        "torch": {}, "gguf": {"quant": "Q8_0"}, "onnx": {}}
    assert set(formats.MANIFEST_QUANTS) == {"gguf", "onnx"}


def test_the_users_hold_the_registry_tables_not_copies():
    assert backends.BACKEND_MODULES is formats.BACKEND_MODULES      # tests add fake backends to it
    assert store.FORMAT_BACKEND is formats.FORMAT_BACKEND
    assert fidelity.SPEC_BACKEND is formats.SPEC_BACKEND
    assert fidelity.QUANT_OPTIONS is formats.QUANT_OPTIONS
    assert fidelity.MANIFEST_QUANTS is formats.MANIFEST_QUANTS


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if f.quants], ids=lambda f: f.name)
def test_store_runs_each_converted_format_with_its_backend(tmp_path, fmt):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": fmt.name}), encoding="utf-8")
    assert store.detect_format(tmp_path) == fmt.name
    assert store.backend_for(tmp_path, None) == fmt.backend
    with pytest.raises(ModelFormatError, match=f"holds a {fmt.name} model"):
        store.backend_for(tmp_path, next(f.backend for f in FORMATS.values() if f is not fmt))


def test_a_manifest_naming_another_format_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tflite"}), encoding="utf-8")
    with pytest.raises(ModelFormatError, match="names no known format"):
        store.detect_format(tmp_path)


def test_a_bad_compare_spec_lists_every_format(tmp_path):
    with pytest.raises(HuatuoError) as caught:
        fidelity.parse_spec("tflite:int8", tmp_path, tmp_path)
    assert "use reference, gguf:QUANT, onnx:QUANT, optionally" in str(caught.value)


# ------------------------------------------------- the converters and the CLI ----
@pytest.mark.parametrize("name", ["gguf", "onnx"])
def test_convert_choices_are_the_registry(name):
    fmt = FORMATS[name]
    params = {p.name: p for p in convert_group.commands[name].params}
    side = {"gguf": "mmproj_type", "onnx": "vision_quant"}[name]
    assert (tuple(params["quant"].type.choices), params["quant"].default) == (fmt.quants, fmt.default_quant)
    assert (tuple(params[side].type.choices), params[side].default) == (fmt.side_quants, fmt.default_side_quant)


def test_gguf_registry_equals_the_converters_quant_tables():
    pytest.importorskip("torch")
    export = importlib.import_module(CONVERTERS["gguf"])
    # the order of export_gguf's own error message: direct types, then llama.cpp's quants
    assert FORMATS["gguf"].quants == (*export.DIRECT_TYPES, *export.LLAMA_QUANTS)
    assert FORMATS["gguf"].side_quants == tuple(export.MMPROJ_TYPES)


def test_onnx_registry_equals_the_converters_quant_modes():
    pytest.importorskip("torch")
    export = importlib.import_module(CONVERTERS["onnx"])
    assert set(FORMATS["onnx"].quants) == set(export.QUANT_MODES)
    assert FORMATS["onnx"].side_quants == tuple(export.VISION_QUANT_MODES)
    assert set(export.GRAPHS.values()) <= set(FORMATS["onnx"].roles)


@pytest.mark.parametrize("name", ["gguf", "onnx"])
def test_the_demo_manifests_fit_the_registry(name):
    manifest = json.loads((DEMO / name / "manifest.json").read_text(encoding="utf-8"))
    fmt = FORMATS[manifest["format"]]
    assert fmt.name == name
    assert {e["role"] for e in manifest["files"].values()} <= set(fmt.roles)
    quants = fmt.manifest_quants(manifest)
    assert len(quants) == 1 and quants <= {q.upper() for q in fmt.quants}
