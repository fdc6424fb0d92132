"""The ONNX vision encoder, shared by the onnx and gguf backends.

`vision.onnx` maps normalized pixels [N, 3, 336, 336] float32 to projected
image features [N, 576, H] float32 (CLIP layer -2 without CLS, then the
projector). Sessions run on CPU unless another execution provider is asked for
and installed.

A graph whose weights are stored float16 and cast to float32 in the graph
(manifest entry role "vision", "quant": "fp16") is opened with CAST_WEIGHTS_PLAN:
with onnxruntime's defaults its ConstantFolding turns every Cast(initializer) into
a new fp32 initializer at session start, which gives back the fp32 graph's
memory (CLIP-L: bench/README.md, "Vision graph dtype").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HuatuoError, ModelFormatError
from ..manifest import MANIFEST_NAME, manifest_problem

# short names accepted from the CLI/API -> onnxruntime execution providers
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def resolve_providers(providers=None) -> list[str]:
    """Provider list for a session: the ones asked for (short or full names),
    always ending with the CPU provider as fallback. One sentence if one asked
    for is not installed."""
    import onnxruntime as ort

    wanted = [PROVIDER_NAMES.get(p.lower(), p) if isinstance(p, str) else p for p in (providers or [])]
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise HuatuoError(
            f"onnxruntime here has no {', '.join(missing)} (available: {', '.join(available)}); "
            "install the onnxruntime build for that device or drop the provider option.")
    return [p for p in wanted if p != PROVIDER_NAMES["cpu"]] + [PROVIDER_NAMES["cpu"]]


@dataclass(frozen=True)
class SessionPlan:
    """How onnxruntime opens one kind of graph: optimization level (a GraphOptimizationLevel
    name), optimizers left off, execution order (an ExecutionOrder name)."""

    level: str = "ORT_ENABLE_ALL"
    disabled: tuple = ()
    order: str = "DEFAULT"


DEFAULT_PLAN = SessionPlan()
# Weights stored fp16 and cast in the graph (CLIP-L, RssAnon after one encode, bench/vision_dtype.py
# --fp16-variants): default plan 1266-1355 MB (ConstantFolding makes fp32 copies: fp32's 1253);
# the default level without ConstantFolding 1824 (a later pass still materialises them); none or basic
# level 2096 (the default order runs every weight Cast first, 1.1 GB alive at once); extended
# with priority order 2462; basic + priority order 279 (each Cast just before its MatMul, the
# fp16 bytes mapped from the file: VmRSS 880 against fp32's 1297).
CAST_WEIGHTS_PLAN = SessionPlan("ORT_ENABLE_BASIC", ("ConstantFolding",), "PRIORITY_BASED")
# a graph file's manifest (role, quant) -> its plan (an fp16 decoder.onnx computes in float16:
# its casts are of activations, the default plan is right for it)
SESSION_PLANS = {("vision", "fp16"): CAST_WEIGHTS_PLAN}


def session_plan(path) -> SessionPlan:
    """The plan `path`'s manifest entry calls for (SESSION_PLANS); the default for a graph
    outside a converted folder or one the manifest does not list (a bad manifest is the
    backend's to refuse, with its own sentence)."""
    path = Path(path)
    try:
        manifest = json.loads((path.parent / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return DEFAULT_PLAN
    if manifest_problem(manifest):
        return DEFAULT_PLAN
    entry = manifest["files"].get(path.name, {})
    return SESSION_PLANS.get((entry.get("role"), entry.get("quant")), DEFAULT_PLAN)


def make_session(path, threads: int | None = None, providers=None, plan: SessionPlan | None = None):
    """An InferenceSession for one graph file; a missing, truncated or corrupt
    file is one ModelFormatError sentence naming it. `plan`: how to open it (None:
    what the folder's manifest calls for, session_plan)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path} is missing; convert the model again or copy the whole model folder.")
    plan = session_plan(path) if plan is None else plan
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, plan.level)
    options.execution_order = getattr(ort.ExecutionOrder, plan.order)
    options.log_severity_level = 4   # load errors become our one sentence, not a red log line
    try:
        return ort.InferenceSession(str(path), options, providers=resolve_providers(providers),
                                    disabled_optimizers=list(plan.disabled) or None)
    except HuatuoError:
        raise
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(
            f"{path} cannot be loaded by onnxruntime ({reason}); the file is truncated, corrupt or "
            "from an incompatible export: convert or download the model again.") from None


class OnnxVisionEncoder:
    """vision.onnx behind one call: encode(pixels [N,3,S,S]) -> features [N,T,H]."""

    def __init__(self, path, threads: int | None = None, providers=None, plan: SessionPlan | None = None):
        self.path = Path(path)
        self.session = make_session(self.path, threads, providers, plan)
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.image_size = inp.shape[-1]           # static in the graph (336 for the real model)
        self.image_tokens, self.hidden_size = out.shape[1], out.shape[2]

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        expected = (3, self.image_size, self.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [N, {', '.join(map(str, expected))}], got {list(pixels.shape)}.")
        if len(pixels) == 0:
            return np.zeros((0, self.image_tokens, self.hidden_size), np.float32)
        (features,) = self.session.run([self.output_name], {self.input_name: pixels})
        return features.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


def check_vision(path: Path, n_embd: int, threads: int, providers=None):
    """vision.onnx opened, its features' width checked against the text model's."""
    encoder = OnnxVisionEncoder(path, threads=threads, providers=providers)
    if encoder.hidden_size != n_embd:
        encoder.close()
        raise ModelFormatError(
            f"{path.name} produces image features of width {encoder.hidden_size} but the text model has "
            f"{n_embd}: it belongs to another model; put back the vision.onnx converted with this model.")
    return encoder


class LazyVision(OnnxVisionEncoder):
    """vision.onnx, opened at the first image that is not in the cache: a question answered
    from the disk cache never pays its session (CLIP-L: 1.2 GB of fp32 weights read); a
    damaged file is then refused at that first image, with the same one sentence.
    An OnnxVisionEncoder to its users; the session is the wrapped one's."""

    def __init__(self, path: Path, width: int, threads: int, providers=None):   # no session yet
        self.path, self.width, self.threads, self.providers = Path(path), width, threads, providers
        self._encoder = None

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        if self._encoder is None:
            self._encoder = check_vision(self.path, self.width, self.threads, self.providers)
        return self._encoder.encode(pixel_values)

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
