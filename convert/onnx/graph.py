"""Export one torch module to one ONNX graph file, and check it.

Two exporters, both exact in fp32 here (max relative logit error ~1e-6 against
torch on the tiny decoder, with and without past, batch 1 and 3):

  torchscript  torch.onnx.export(dynamo=False), the default: ~30x faster on
               the tiny models (decoder 0.7 s vs 22 s on this 2-core machine),
               readable symbolic dims (b, l, p, s). Deprecated by torch since
               2.9 but present in 2.13.
  dynamo       torch.onnx.export(dynamo=True), the maintained route; kept as an
               option for when the TorchScript exporter is removed.

Graphs larger than protobuf's 2 GB limit keep their weights in one
`<graph>.onnx.data` file beside them; tests can force that layout on a tiny
model. Everything here works on file paths, never on an in-memory proto > 2 GB
(onnx.checker/onnx.save fail on those with EncodeError).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import os
import stat
import tempfile
import warnings
from pathlib import Path

from huatuo_lite.errors import HuatuoError

PROTOBUF_LIMIT = 2 * 1024**3  # bytes; a single .onnx protobuf cannot exceed 2 GB
# Weights past this go to `<name>.data` beside the graph: onnxruntime maps an external-data file
# but must parse and copy weights held inside the protobuf. The small profile's int8 decoder
# (790 MB): session 0.50-0.55 s and RssAnon 662-666 MB external, 0.96-1.31 s and 942-1223 MB
# inline (2 runs each), the larger part of an ONNX cache-hit ask's fixed cost (bench/README.md).
INLINE_BYTES = 32 * 2**20
OPSET = 18
EXPORTERS = ("torchscript", "dynamo")


def export_graph(module, args: tuple, path: Path, *, input_names: list, output_names: list,
                 dynamic_axes: dict, force_external_data: bool = False,
                 exporter: str = "torchscript") -> list[Path]:
    """Export `module(*args)` to `path`; returns the files written (the graph, then
    its external data file if any). `dynamic_axes`: {input/output name: {dim: label}}.
    `args` must use batch >= 2 and distinct sizes >= 2 for every dynamic dim
    (a size-1 example may be specialised to a static 1)."""
    runners = {"torchscript": _torchscript, "dynamo": _dynamo}
    if exporter not in runners:
        raise HuatuoError(f"Unknown ONNX exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}.")
    module.eval()
    external = _needs_external(module, force_external_data)
    if not external:
        runners[exporter](module, args, path, input_names, output_names, dynamic_axes)
        return graph_files(path)
    # Big graph: export into scratch (the TorchScript exporter writes one file per
    # tensor past 2 GB), then re-save with every weight in one .data file.
    import onnx

    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as scratch:
        tmp = Path(scratch) / path.name
        runners[exporter](module, args, tmp, input_names, output_names, dynamic_axes)
        return save_graph(onnx.load(str(tmp)), path, force_external_data=True)


def _torchscript(module, args, path, input_names, output_names, dynamic_axes):
    import torch

    with torch.no_grad(), _quiet():
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=OPSET,
                          do_constant_folding=True)


def _dynamo(module, args, path, input_names, output_names, dynamic_axes):
    import torch

    with torch.no_grad(), _quiet():
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                    output_names=output_names, opset_version=OPSET, optimize=True,
                                    dynamic_shapes=_dynamic_shapes(module, input_names, dynamic_axes))
    program.save(str(path), external_data=False)


def _dynamic_shapes(module, input_names: list, dynamic_axes: dict) -> tuple:
    """dynamic_axes -> dynamo's dynamic_shapes, nested like forward's arguments
    (a *varargs tail is one nested tuple)."""
    import torch

    flat = [{dim: torch.export.Dim.DYNAMIC for dim in dynamic_axes.get(name, {})} for name in input_names]
    params = list(inspect.signature(module.forward).parameters.values())
    fixed = sum(p.kind != p.VAR_POSITIONAL for p in params)
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    return (*flat[:fixed], tuple(flat[fixed:])) if has_varargs else tuple(flat)


def save_graph(model, path: Path, force_external_data: bool = False) -> list[Path]:
    """Save a proto; its weights go to `<name>.data` past INLINE_BYTES or when forced."""
    import onnx

    size = sum(init.ByteSize() for init in model.graph.initializer)
    external = force_external_data or size > INLINE_BYTES
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data_path(path).name, size_threshold=1024)
        # onnx creates the .data file 0600: give it the graph's own (umask) mode, or a model folder
        # shared with another user or a service account has a graph it cannot read
        os.chmod(external_data_path(path), stat.S_IMODE(os.stat(path).st_mode))
    else:
        onnx.save_model(model, str(path))
    return graph_files(path)


def _needs_external(module, force: bool) -> bool:
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    return force or size > PROTOBUF_LIMIT * 0.9   # margin for the graph itself


def external_data_path(path: Path) -> Path:
    """Where a graph keeps its weights when they do not fit in the protobuf."""
    return path.with_name(path.name + ".data")


def graph_files(path: Path) -> list[Path]:
    data = external_data_path(path)
    return [path, data] if data.is_file() else [path]


def check_graph(path: Path) -> None:
    """onnx.checker on the file path (works past 2 GB, with external data)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=False)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress lines and deprecation warnings per graph."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
