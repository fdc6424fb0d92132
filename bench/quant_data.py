"""The data `bench/quant_candidates.py` picks and calibrates on, made again from the synthetic
generator the demo was trained with (issue #21): a validation split (80 cases -> 337 questions,
the demo's question kinds) and a training split's conversations for GPTQ / imatrix calibration
(200 cases -> 1116 records). Seed 0, as measured in models/demo/FIDELITY.md; the demo's own
held-out test split (models/demo/eval) is never touched.

    python bench/quant_data.py OUT      # then OUT/val/eval/eval.json and OUT/train_conversations.json
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def make(out: Path, seed: int = 0) -> dict:
    from huatuo_lite.convert.demo.build import LESION_MARKER, copy_eval_set, without_kinds
    from huatuo_lite.convert.synth.make import make_synthetic_set

    data = make_synthetic_set(out / "data", n_train=200, n_val=80, n_test=0, seed=seed, lesion_marker=LESION_MARKER)
    for name in ("train_conversations", "val_conversations", "val_vqa"):
        without_kinds(data[name])                  # the demo's kinds (its count questions dropped)
    validation = copy_eval_set(data["val_vqa"], out / "val")          # OUT/val/eval/eval.json + images/
    shutil.copy2(data["train_conversations"], out / "train_conversations.json")
    return {"validation": len(json.loads(validation.read_text(encoding="utf-8"))),
            "calibration": len(json.loads((out / "train_conversations.json").read_text(encoding="utf-8")))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(make(args.out, args.seed)))


if __name__ == "__main__":
    main()
