"""`huatuo-lite convert ...`: the heavy side (needs the `convert` extra).

Imports of huatuo_lite.convert happen inside the commands, so `huatuo-lite ask`
never loads torch."""
from __future__ import annotations

import importlib

import click

from ..errors import HuatuoError
from ..formats import GGUF, ONNX
from ..families.llava import VARIANTS
from ..families.qwen25vl import VARIANTS as QWEN25VL_VARIANTS
from ..manifest import read_manifest
from ..llama_tools import self_test_verdict
from ..interrupt import reporting

# vision.onnx weight storage for `convert gguf` (convert/onnx/vision_dtype.py VISION_DTYPES; spelled
# here so that --help does not import the converters)
VISION_DTYPES = ("auto", "fp32", "fp16", "int8")
CONVERT_EXTRA_HINT = "install the conversion tools with `pip install 'huatuo-lite[convert]'` (torch first, see README)"


def convert_module(name: str):
    """huatuo_lite.convert.<name>, or one sentence saying how to install it."""
    try:
        return importlib.import_module(f"huatuo_lite.convert.{name}")
    except ImportError as exc:
        raise HuatuoError(f"Converting needs {exc.name or 'extra packages'}: {CONVERT_EXTRA_HINT}.") from None


@click.group()
def convert():
    """Convert upstream checkpoints to GGUF or ONNX, or make tiny test checkpoints."""


@convert.command("tiny")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--variant", type=click.Choice([*VARIANTS, *QWEN25VL_VARIANTS]), default="7b", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def convert_tiny(out_dir, variant, seed):
    """Write a tiny random checkpoint in the exact upstream layout (for tests and demos).

    \b
    Example:
      huatuo-lite convert tiny ./tiny-7b --variant 7b
    """
    with reporting(out_dir, "config.json"):
        path = convert_module("tiny.make").make_tiny(out_dir, variant=variant, seed=seed)
    click.echo(str(path))


@convert.command("gguf")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--quant", default=GGUF.default_quant, show_default=True, type=click.Choice(GGUF.quants))
@click.option("--mmproj-type", default=GGUF.default_side_quant, show_default=True,
              type=click.Choice(GGUF.side_quants))
@click.option("--allow-pickle", is_flag=True, help="Accept a pytorch_model.bin checkpoint (runs pickle code).")
@click.option("--imatrix", "calibration", type=click.Path(dir_okay=False, exists=True), default=None,
              metavar="CALIB.json", help="Quantize with an importance matrix computed on these question/answer "
              "records (PubMedVision or eval format); needs the native tools (CMakeLists.txt).")
@click.option("--name", default=None, help="The model's name for the file names and metadata "
              "(NAME-QUANT.gguf, mmproj-NAME-F16.gguf; default: the source folder's name).")
@click.option("--vision-dtype", type=click.Choice(VISION_DTYPES), default="auto", show_default=True,
              help="LLaVA: vision.onnx's weights. auto keeps int8 only if its image features match fp32's "
              "(per-token cosine >= 0.999 on probe images), else fp32; recorded in manifest.json.")
def convert_gguf(src, out_dir, quant, mmproj_type, allow_pickle, calibration, name, vision_dtype):
    """Convert an upstream folder to a GGUF text model + mmproj (+ vision.onnx).

    \b
    Example:
      huatuo-lite convert gguf ./HuatuoGPT-Vision-7B ./hv7b-gguf --quant Q4_K_M
      huatuo-lite convert gguf ./HuatuoGPT-Vision-7B ./hv7b-gguf --quant Q4_K_M --imatrix calib.json
    """
    with reporting(out_dir, "manifest.json"):
        out = convert_module("gguf.export").export_gguf(src, out_dir, quant=quant, mmproj_type=mmproj_type,
                                                         allow_pickle=allow_pickle, imatrix=calibration, name=name,
                                                         vision_dtype=vision_dtype)
    click.echo(self_test_verdict(read_manifest(out_dir).get("mtmd_self_test")), err=True)
    click.echo(str(out))


@convert.command("onnx")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--quant", default=ONNX.default_quant, show_default=True, type=click.Choice(ONNX.quants))
@click.option("--vision-quant", default=ONNX.default_side_quant, show_default=True,
              type=click.Choice(ONNX.side_quants))
@click.option("--block-size", default=32, show_default=True, type=click.IntRange(16), help="int4/int8 block size.")
@click.option("--algorithm", default=None, type=click.Choice(["default", "rtn", "k_quant", "hqq", "gptq"]),
              help="int4 weight algorithm, named as onnxruntime's matmul_nbits_quantizer names them "
              "(gptq needs --calibration). Default for int4: k_quant with --keep-int8 mixed and an fp16 "
              "embedding table (chosen on the demo's validation split, models/demo/FIDELITY.md).")
@click.option("--symmetric/--asymmetric", default=None,
              help="int4 zero points: none (symmetric) or one per block; default: the algorithm's own "
              "(k_quant and hqq are asymmetric only).")
@click.option("--keep-int8", default=None, type=click.Choice(["none", "lm_head", "mixed"]),
              help="int4 parts kept at 8 bits: lm_head, or lm_head plus v_proj/down_proj of llama.cpp's "
              "use_more_bits layers (onnxruntime-genai's k_quant_mixed).")
@click.option("--embed-quant", type=click.Choice(["int4", "fp16"]), default=None,
              help="int4: the token embedding table's storage (default fp16; int4 is a quarter of its bytes).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None, metavar="CALIB.json",
              help="Question/answer records (PubMedVision or eval format) for --algorithm gptq; never the "
              "questions you will score.")
@click.option("--allow-pickle", is_flag=True, help="Accept a pytorch_model.bin checkpoint (runs pickle code).")
@click.option("--name", default=None, help="The model's name for the manifest and model card "
              "(default: the source's name).")
def convert_onnx(src, out_dir, quant, vision_quant, block_size, algorithm, symmetric, keep_int8, embed_quant,
                 calibration, allow_pickle, name):
    """Convert an upstream folder to vision/embed/decoder ONNX graphs.

    \b
    Example:
      huatuo-lite convert onnx ./HuatuoGPT-Vision-7B ./hv7b-onnx --quant int4
      huatuo-lite convert onnx ./HuatuoGPT-Vision-7B ./hv7b-onnx --quant int4 --algorithm k_quant --keep-int8 mixed
    """
    with reporting(out_dir, "manifest.json"):
        out = convert_module("onnx.export").export_onnx(src, out_dir, quant=quant, vision_quant=vision_quant,
                                                        block_size=block_size, allow_pickle=allow_pickle, name=name,
                                                        algorithm=algorithm, symmetric=symmetric,
                                                        keep_int8=keep_int8, calibration=calibration,
                                                        embed_quant=embed_quant)
    click.echo(str(out))
