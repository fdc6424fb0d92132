"""Export one torch module to one ONNX graph file, and check it.

Route: `torch.onnx.export(..., dynamo=True)` (the maintained exporter; the
TorchScript one is deprecated in torch 2.9+). Graphs larger than protobuf's 2 GB
limit keep their weights in one `<graph>.onnx.data` file beside them; tests can
force that layout on a tiny model. Everything here works on file paths, never on
an in-memory proto > 2 GB (onnx.checker/onnx.save fail on those with EncodeError).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

PROTOBUF_LIMIT = 2 * 1024**3  # bytes; a single .onnx protobuf cannot exceed 2 GB
OPSET = 18


def export_graph(module, args: tuple, path: Path, *, input_names: list, output_names: list,
                 dynamic_shapes, force_external_data: bool = False) -> list[Path]:
    """Export `module(*args)` to `path`. Returns the files written (the graph,
    then its external data file if any). `args` must use batch >= 2: a batch-1
    example is specialised to a static 1 even when marked dynamic."""
    import torch

    module.eval()
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, opset_version=OPSET, optimize=True, verbose=False)
    program.save(str(path), external_data=_needs_external(module, force_external_data))
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
    """The dynamo exporter prints progress lines and warnings per graph."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
