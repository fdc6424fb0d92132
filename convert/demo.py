"""The demo model: a tiny 7B-layout checkpoint trained on the synthetic set.

    python -m huatuo_lite.convert.demo OUT_DIR [--train 300 --epochs 2 ...]

Steps: synth.make_synthetic_set -> tiny.make_tiny (7B layout, hidden sizes
multiples of 256) -> train.train(mode="full") on the train conversations ->
the test split copied into the checkpoint as fidelity.EVAL_SET (so every
`convert` of it writes a FIDELITY.md) -> evaluate.run_eval on that split.

It is a pipeline demonstration trained on synthetic shapes, not a medical
model. Training is CPU-sized: a few hundred images, one or two epochs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

DEMO_SIZES = dict(hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=2,
                  vision_hidden_size=256, vision_intermediate_size=512, vision_layers=3, vision_heads=4)
DEMO_TRAINING = dict(lr=1e-3, schedule="cosine", warmup_ratio=0.03, batch_size=8, weight_decay=0.0)


def copy_eval_set(eval_json: Path, model_dir: Path) -> Path:
    """The eval JSON and just the images it names, as model_dir/eval/eval.json + images/."""
    from huatuo_lite.fidelity import EVAL_SET

    target = model_dir / EVAL_SET
    records = json.loads(Path(eval_json).read_text(encoding="utf-8"))
    for name in sorted({p for r in records for p in r["image"]}):
        dest = target.parent / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(eval_json).parent / name, dest)
    target.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return target


def lettered_only(conversations: Path) -> Path:
    """The conversations answered with an option letter, in a file beside them
    (the answer the eval scores is one token; long descriptions would
    otherwise dominate a token-averaged loss)."""
    from huatuo_lite.family import EVAL_ANSWER_SUFFIX

    records = json.loads(conversations.read_text(encoding="utf-8"))
    kept = [r for r in records if r["conversations"][0]["value"].endswith(EVAL_ANSWER_SUFFIX)]
    path = conversations.with_name(conversations.stem + "_lettered.json")
    path.write_text(json.dumps(kept, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def build_demo(out_dir, n_train: int = 300, n_val: int = 20, n_test: int = 80, seed: int = 0,
               epochs: float = 2.0, max_steps: int | None = None, progress: bool = True,
               sizes: dict | None = None, letters_only: bool = False, **training) -> dict:
    """Build, train and evaluate the demo model under out_dir; returns
    {"model", "data", "train_loss", "report"} (report: evaluate's dict).
    letters_only trains on the lettered-options conversations alone."""
    from huatuo_lite.evaluate import run_eval

    from .synth import make_synthetic_set
    from .tiny import make_tiny
    from .train import train

    out = Path(out_dir)
    data = make_synthetic_set(out / "data", n_train, n_val, n_test, seed)
    base = make_tiny(out / "base", variant="7b", seed=seed, **(sizes or DEMO_SIZES))
    conversations = lettered_only(data["train_conversations"]) if letters_only else data["train_conversations"]
    result = train(conversations, base, out / "model", mode="full", seed=seed, epochs=epochs,
                   max_steps=max_steps, progress=progress, **{**DEMO_TRAINING, **training})
    eval_json = copy_eval_set(data["test_vqa"], Path(result.model_dir))
    report = run_eval(result.model_dir, eval_json, out / "eval-test", progress=progress)
    return {"model": Path(result.model_dir), "data": data, "train_loss": result.losses[-10:],
            "steps": result.steps, "seconds": result.seconds, "report": report}


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train and evaluate the demo model.")
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=80)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--lr", type=float, default=DEMO_TRAINING["lr"])
    parser.add_argument("--batch-size", type=int, default=DEMO_TRAINING["batch_size"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--letters-only", action="store_true")
    args = parser.parse_args(argv)
    built = build_demo(args.out_dir, n_train=args.train, n_test=args.test, seed=args.seed, epochs=args.epochs,
                       max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                       letters_only=args.letters_only)
    total = built["report"]["total"]
    print(json.dumps({"model": str(built["model"]), "steps": built["steps"], "seconds": round(built["seconds"]),
                      "last_losses": built["train_loss"], "test_accuracy": total["accuracy"],
                      "chance": total["chance"], "count": total["count"],
                      "subsets": {k: round(v["accuracy"], 3) for k, v in built["report"]["subsets"].items()}},
                     indent=1))


if __name__ == "__main__":
    main()
