"""The demo model: a tiny 7B-layout checkpoint trained on the synthetic set.

    python -m huatuo_lite.convert.demo OUT_DIR [--train 300 --epochs 2 ...]

Steps: synth.make_synthetic_set (lesions painted with a colour marker) ->
tiny.make_tiny (7B layout, hidden sizes multiples of 256) -> demo_init (the
designed, frozen vision tower; a uniform first attention layer) ->
train.train(mode="full", train_vision=False) on the lettered-options train
conversations without the count kind -> the test split (same kinds) copied into
the checkpoint as fidelity.EVAL_SET (so every `convert` of it writes a
FIDELITY.md) -> evaluate.run_eval on that split.

It is a pipeline demonstration trained on synthetic shapes, not a medical
model. Training is CPU-sized: a few hundred images, a few hundred steps.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

DEMO_SIZES = dict(hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=2,
                  vision_hidden_size=256, vision_intermediate_size=512, vision_layers=3, vision_heads=4,
                  num_shards=2)
DEMO_TRAINING = dict(lr=1e-3, schedule="cosine", warmup_ratio=0.03, batch_size=8, weight_decay=0.0,
                     train_vision=False, train_embeddings=False)
LESION_MARKER = (255, 40, 0)     # a colour no drawn anatomy has: lesions are high-contrast
DROPPED_KINDS = ("count",)       # counting 1-3 lesions is what a model this small does not learn here


def without_kinds(path: Path, kinds=DROPPED_KINDS) -> Path:
    """The eval items / conversations of `path` minus those of `kinds`, rewritten in
    place; returns path."""
    records = json.loads(path.read_text(encoding="utf-8"))
    kept = [r for r in records if r["id"].split("_")[2] not in kinds]     # "<split>_<case>_<kind>[_mc]"
    path.write_text(json.dumps(kept, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def copy_eval_set(eval_json: Path, model_dir: Path) -> Path:
    """The eval JSON and just the images it names, as model_dir/eval/eval.json + images/."""
    from huatuo_lite.eval.fidelity import EVAL_SET

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
    from huatuo_lite.families.llava import EVAL_ANSWER_SUFFIX

    records = json.loads(conversations.read_text(encoding="utf-8"))
    kept = [r for r in records if r["conversations"][0]["value"].endswith(EVAL_ANSWER_SUFFIX)]
    path = conversations.with_name(conversations.stem + "_lettered.json")
    path.write_text(json.dumps(kept, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def build_demo(out_dir, n_train: int = 300, n_val: int = 20, n_test: int = 80, seed: int = 0,
               epochs: float = 2.0, max_steps: int | None = None, progress: bool = True,
               sizes: dict | None = None, letters_only: bool = True, designed: bool = True,
               marker: tuple | None = LESION_MARKER, drop_kinds=DROPPED_KINDS, init=None, **training) -> dict:
    """Build, train and evaluate the demo model under out_dir; returns
    {"model", "data", "train_loss", "steps", "seconds", "report"} (report:
    evaluate's dict). letters_only trains on the lettered-options conversations
    alone; designed gives the model demo_init's tower and first attention layer.
    init: continue from this earlier demo model folder instead of a new checkpoint -- a
    further training stage. With the same seed every case comes from its own
    (seed, split, index) stream, so a larger n_train keeps the earlier images and adds
    new ones, and the test split stays the same."""
    from huatuo_lite.eval.run import run_eval

    from .tower import apply_designed_tower, designed_first_attention
    from ..synth.make import make_synthetic_set
    from ..tiny.make import make_tiny
    from ..train.run import train

    out = Path(out_dir)
    data = make_synthetic_set(out / "data", n_train, n_val, n_test, seed, lesion_marker=marker)
    for name in ("train_conversations", "val_conversations", "val_vqa", "test_vqa"):
        without_kinds(data[name], drop_kinds)
    if init is not None:                 # a further stage from an earlier demo model
        base = Path(init)
    else:
        base = make_tiny(out / "base", variant="7b", seed=seed, **(sizes or DEMO_SIZES))
        if designed:
            apply_designed_tower(base)
            designed_first_attention(base)
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init", help="continue from this earlier demo model folder (a further stage; same --seed)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    built = build_demo(args.out_dir, n_train=args.train, n_test=args.test, seed=args.seed, epochs=args.epochs,
                       max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, init=args.init)
    total = built["report"]["total"]
    print(json.dumps({"model": str(built["model"]), "steps": built["steps"], "seconds": round(built["seconds"]),
                      "last_losses": built["train_loss"], "test_accuracy": total["accuracy"],
                      "chance": total["chance"], "count": total["count"],
                      "subsets": {k: round(v["accuracy"], 3) for k, v in built["report"]["subsets"].items()}},
                     indent=1))


if __name__ == "__main__":
    main()
