"""How far do stock llama.cpp's answers drift from ours? Eval accuracy through llama-mtmd-cli.

    python native/stock_drift.py GGUF_DIR EVAL.json [--limit 60 --n-predict 4]

For every eval item (upstream eval format): the answer of the GGUF backend, of the
built llama-mtmd-cli (LLaVA class-token fix applied) and of the same tool with
llama-cpp-python's stock libmtmd (huatuo_lite.llama_tools.stock_mtmd_dir), all greedy on
the same 336x336 pixels (image/load.py's preprocessing saved as PNG, so libmtmd's own
resize/pad is the identity). Prints accuracy per engine and agreement with ours.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def preprocessed_png(image: str, out: Path) -> Path:
    """image/load.py's 336x336 pixels of `image`, as the exact uint8 PNG they came from."""
    from PIL import Image

    from huatuo_lite.backends.gguf_mtmd import pixels_to_rgb8
    from huatuo_lite.image.load import load_image, preprocess

    rgb = pixels_to_rgb8(preprocess([load_image(image)]))[0]
    Image.fromarray(rgb, "RGB").save(out)
    return out


def backend_answer(engine, images, question: str, n_predict: int) -> bytes:
    from huatuo_lite.families.llava import GenerationConfig
    from huatuo_lite.generate import run

    config = GenerationConfig(temperature=0.0, repetition_penalty=1.0, max_new_tokens=n_predict)
    generation = run(engine, [str(p) for p in images], question, config=config)
    for _ in generation:
        pass
    return b"".join(engine.token_bytes(t) for t in generation.answer.token_ids).strip()


def _cli_or_none(roles: dict, images, question: str, n_predict: int, libmtmd_dir) -> bytes | None:
    """llama-mtmd-cli's answer, or None when it kept losing its output (llama.cpp's logger)."""
    from huatuo_lite.errors import HuatuoError
    from huatuo_lite.llama_tools import mtmd_cli_answer

    try:
        return mtmd_cli_answer(roles["text"], roles["mmproj"], images, question, n_predict, libmtmd_dir=libmtmd_dir)
    except HuatuoError:
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf_dir", type=Path)
    parser.add_argument("eval_json", type=Path)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--n-predict", type=int, default=4)
    args = parser.parse_args(argv)

    from huatuo_lite.backends import load_backend
    from huatuo_lite.eval.run import load_items, score
    from huatuo_lite.manifest import read_manifest
    from huatuo_lite.llama_tools import stock_mtmd_dir

    roles = {e["role"]: args.gguf_dir / n for n, e in read_manifest(args.gguf_dir)["files"].items()}
    items, _ = load_items(args.eval_json, args.limit)
    engine = load_backend("gguf").open_engine(args.gguf_dir, threads=1)
    work = Path(tempfile.mkdtemp(prefix="stock-drift-"))
    stock_dir = stock_mtmd_dir(work / "stock-lib")
    answers = {"ours": [], "fixed_cli": [], "stock_cli": []}
    for item in items:
        images = [preprocessed_png(p, work / f"{item.index}-{i}.png") for i, p in enumerate(item.images)]
        cli = lambda lib=None: _cli_or_none(roles, images, item.prompt, args.n_predict, lib)  # noqa: E731
        answers["ours"].append(backend_answer(engine, images, item.prompt, args.n_predict))
        answers["fixed_cli"].append(cli())
        answers["stock_cli"].append(cli(stock_dir))
    engine.close()
    letters = {k: [score(item, a.decode("utf-8", "replace"))["letter"] if a is not None else None
                   for item, a in zip(items, v)] for k, v in answers.items()}
    summary = {"items": len(items), "lost_cli_outputs": sum(a is None for v in answers.values() for a in v)}
    for name, got in letters.items():
        summary[name] = {
            "accuracy": sum(g is not None and g == item.answer_letter for g, item in zip(got, items)) / len(items),
            "same_letter_as_ours": sum(a == b for a, b in zip(got, letters["ours"])) / len(items),
            "same_text_as_ours": sum(a == b for a, b in zip(answers[name], answers["ours"])) / len(items)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
