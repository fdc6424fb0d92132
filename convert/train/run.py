"""The training recipe: `train(data, model, out, mode=..., **options) -> TrainResult`.

A plain torch loop (AdamW, warmup + cosine/linear/constant schedule, gradient
accumulation and clipping) over train_data's examples and train_model's forward.

Output in OUT:
  lora / qlora  adapter_config.json + adapter_model.safetensors (peft's format;
                `huatuo-lite train merge OUT --model SRC --out DIR` makes a full model)
  align / full  a full checkpoint in the source's upstream layout (checkpoint_writer)
  always        train_log.json (options, losses, validation loss, skipped records),
                checkpoints/step-NNNNNN/ when save_every is set (resume=True continues
                from the newest: trainable weights, optimizer, scheduler, RNG, losses)

What is family-specific (opening the folder, records -> ids and labels, a batch's loss,
writing a full model) comes from the folder's family row (family.py); LLAVA_HOOKS below
is the LLaVA family's, convert/qwen25vl/train.py holds Qwen2.5-VL's.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from huatuo_lite.image import load as image_mod
from huatuo_lite.errors import HuatuoError
from huatuo_lite.families.llava import CONTEXT_LENGTH
from huatuo_lite.fsutil import atomic_path, staging_dir

from ..checkpoint.read import open_checkpoint
from ..checkpoint.writer import write_checkpoint
from .family import FamilyHooks, family_hooks
from .data import DataError, build_examples, read_records, split_validation
from .model import (LoraOptions, batch_loss, build_trainable, canonical_state, freeze_tower, tower_trains,
                          trainable_state, vision_hidden)
from ..reference.build import build_model

LR_DEFAULTS = {"align": 1e-3, "lora": 2e-4, "qlora": 2e-4, "full": 2e-5}
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
ADAPTER_MODES = ("lora", "qlora")
LOG_NAME = "train_log.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class TrainOptions:
    lr: float | None = None            # None: LR_DEFAULTS[mode]
    schedule: str = "cosine"           # a key of SCHEDULES
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int | None = None       # optimizer steps; wins over epochs
    batch_size: int = 1
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    seed: int = 0
    max_length: int = CONTEXT_LENGTH
    image_root: str | None = None      # default: the data file's folder
    val_split: float = 0.0
    val_every: int | None = None       # steps between validation losses (also at the end)
    save_every: int | None = None      # steps between resumable checkpoints
    resume: bool | str = False         # True: newest checkpoint in OUT; or a checkpoint folder
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    train_projector: bool | None = None   # lora/qlora: the projector trains fully too (None: the
                                          # family's default, FamilyHooks.train_projector)
    bad_records: str = "refuse"        # or "skip"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"
    device: str = "auto"               # "cpu", "cuda", "auto"
    feature_cache: int = 256           # frozen vision tower: images whose features are kept
    train_vision: bool = True          # full mode: False keeps the vision tower frozen (upstream stage 2)
    train_embeddings: bool = True      # False keeps the token embedding table frozen (Adam's scale-free
                                       # steps otherwise rewrite N(0, 0.02) rows within ~20 steps)
    progress: bool = True


@dataclass
class TrainResult:
    mode: str
    steps: int
    losses: list                       # mean training loss per optimizer step (1-based steps)
    val_loss: float | None
    val_losses: list                   # [(step, loss)]
    out_dir: Path
    adapter_dir: Path | None           # lora / qlora
    model_dir: Path | None             # align / full
    checkpoints: list = field(default_factory=list)
    skipped: list = field(default_factory=list)   # train_data.DataProblem
    n_examples: int = 0
    seconds: float = 0.0


@dataclass
class Run:
    """What one training run holds: the model (net: what the optimizer sees, a PeftModel
    in lora modes; model: the transformers model inside), the batch loss (batch ->
    (mean loss over its trained tokens, their number)) and the optimizer."""

    mode: str
    opts: TrainOptions
    out: Path
    net: object
    model: object
    loss: object
    optimizer: object
    scheduler: object
    params: list


def make_options(mode: str, options: dict) -> TrainOptions:
    if mode not in LR_DEFAULTS:
        raise HuatuoError(f"Unknown training mode {mode!r}: choose one of {', '.join(LR_DEFAULTS)}.")
    known = {f.name for f in fields(TrainOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise HuatuoError(f"Unknown training option {unknown[0]!r}: known options are {', '.join(sorted(known))}.")
    opts = TrainOptions(**{k: v for k, v in options.items() if v is not None})
    if opts.schedule not in SCHEDULES:
        raise HuatuoError(f"Unknown schedule {opts.schedule!r}: choose one of {', '.join(SCHEDULES)}.")
    if opts.batch_size < 1 or opts.grad_accum < 1:
        raise HuatuoError("Batch size and gradient accumulation must be at least 1.")
    return opts if opts.lr is not None else TrainOptions(**{**asdict(opts), "lr": LR_DEFAULTS[mode]})


# ------------------------------------------------------------------ data ----
class ImageFeed:
    """Image paths -> vision features [N, T, Dv]; kept per path while the tower is frozen
    (the same image gives the same features every epoch)."""

    def __init__(self, llava, select_layer: int, cache_size: int):
        self.llava, self.select_layer = llava, select_layer
        self.cache_size = cache_size if not tower_trains(llava) else 0
        self.cache: dict = {}
        weight = llava.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype

    def _pixels(self, paths: list) -> torch.Tensor:
        pixels = image_mod.preprocess([image_mod.load_image(p) for p in paths])
        return torch.from_numpy(pixels).to(self.device, self.dtype)

    def __call__(self, paths: list):
        if not paths:
            return None
        if not self.cache_size:
            return vision_hidden(self.llava, self._pixels(paths), self.select_layer)
        found = {p: self.cache[p] for p in paths if p in self.cache}
        todo = list(dict.fromkeys(p for p in paths if p not in found))
        if todo:
            with torch.no_grad():
                fresh = vision_hidden(self.llava, self._pixels(todo), self.select_layer)
            found.update(zip(todo, fresh))
            for path, rows in zip(todo, fresh):
                if len(self.cache) >= self.cache_size:
                    self.cache.pop(next(iter(self.cache)))
                self.cache[path] = rows
        return torch.stack([found[p] for p in paths])


def _batch_hidden(feed: ImageFeed, batch: list):
    paths = [p for ex in batch for p in ex.images]
    try:
        return feed(paths)
    except HuatuoError as err:
        raise DataError(f"Record {batch[0].record_index} (or another in its batch): {err}") from None


def _micro_batch(examples: list, index: int, opts: TrainOptions) -> list:
    """The index-th micro-batch of the endless, per-epoch reshuffled stream."""
    per_epoch = math.ceil(len(examples) / opts.batch_size)
    epoch, k = divmod(index, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(opts.seed * 100003 + epoch))
    return [examples[i] for i in order[k * opts.batch_size:(k + 1) * opts.batch_size].tolist()]


def total_steps(n_examples: int, opts: TrainOptions) -> int:
    if opts.max_steps:
        return int(opts.max_steps)
    per_epoch = math.ceil(n_examples / opts.batch_size)
    return max(1, math.ceil(opts.epochs * per_epoch / opts.grad_accum))


# ---------------------------------------------------------------- steps ----
def _optimizer_step(run: Run, examples: list, step: int) -> float:
    """One optimizer step over grad_accum micro-batches; returns their mean loss."""
    total, accum = 0.0, run.opts.grad_accum
    for micro in range(accum):
        batch = _micro_batch(examples, step * accum + micro, run.opts)
        loss, _ = run.loss(batch)
        (loss / accum).backward()
        total += float(loss.detach()) / accum
    if run.opts.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, run.opts.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(run: Run, examples: list) -> float:
    """Token-weighted mean loss over the reply tokens of `examples` (eval mode)."""
    run.net.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(examples), run.opts.batch_size):
        batch = examples[start:start + run.opts.batch_size]
        loss, n = run.loss(batch)
        loss_sum, tokens = loss_sum + float(loss) * n, tokens + n
    run.net.train()
    return loss_sum / max(tokens, 1)


# ----------------------------------------------------------- checkpoints ----
def _save_state(run: Run, step: int, history: dict) -> Path:
    from safetensors.torch import save_file

    final = run.out / CHECKPOINTS / f"step-{step:06d}"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        weights = {k: v.contiguous().cpu() for k, v in trainable_state(run.net).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": run.optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        state = {"step": step, "mode": run.mode, "scheduler": run.scheduler.state_dict(), **history}
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    return final


def _find_checkpoint(out: Path, resume) -> Path:
    if resume is not True:
        return Path(resume)
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    if not found:
        raise HuatuoError(f"Nothing to resume: {out / CHECKPOINTS} holds no checkpoint (train with --save-every).")
    return found[-1]


def _restore(run: Run, path: Path) -> dict:
    """Load a checkpoint into the run; returns its history (losses, val_losses)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        saved = load_file(str(path / "trainable.safetensors"))
        bundle = torch.load(path / "optimizer.pt", weights_only=True)
    except (OSError, ValueError) as err:
        raise HuatuoError(f"{path} is not a complete training checkpoint ({err}); resume from another one.") from None
    params = dict(run.net.named_parameters())
    if state.get("mode") != run.mode or set(saved) != set(trainable_state(run.net)):
        raise HuatuoError(f"{path} was saved by a {state.get('mode')!r} run with other trainable weights; "
                          f"resume it with the same --mode and LoRA options (this run: {run.mode!r}).")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    run.optimizer.load_state_dict(bundle["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    # the saved lr belongs to the saved schedule; a run resumed with more steps has its own
    sched = run.scheduler
    for group, base, factor in zip(run.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(sched.last_epoch)
    torch.set_rng_state(bundle["rng"])
    return {"losses": state["losses"], "val_losses": [tuple(v) for v in state["val_losses"]]}


# ---------------------------------------------------------------- outputs ----
def _write_outputs(out: Path, run: Run, ckpt, hooks: FamilyHooks) -> tuple:
    """(adapter_dir, model_dir) after training."""
    if run.mode in ADAPTER_MODES:
        run.net.peft_config["default"].base_model_name_or_path = str(Path(ckpt.root).resolve())
        with staging_dir(out) as stage:
            run.net.save_pretrained(str(stage))
        return out, None
    hooks.write_model(ckpt, run.model, out)
    return None, out


def _write_log(out: Path, result: TrainResult, opts: TrainOptions, source: str, data: str, family: str) -> None:
    log = {"mode": result.mode, "family": family, "source_model": source, "data": data, "options": asdict(opts),
           "steps": result.steps, "losses": result.losses, "val_loss": result.val_loss,
           "val_losses": result.val_losses, "n_examples": result.n_examples,
           "skipped": [p.sentence() for p in result.skipped], "seconds": result.seconds}
    with atomic_path(out / LOG_NAME) as tmp:
        tmp.write_text(json.dumps(log, indent=1, default=str) + "\n", encoding="utf-8")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ------------------------------------------------------------------- API ----
def _examples(data, ckpt, opts: TrainOptions) -> tuple:
    """(train examples, validation examples, skipped problems) from the data file."""
    from ..checkpoint.tokenizer import open_tokenizer

    tokenizer = open_tokenizer(ckpt.tokenizer_dir or ckpt.root)   # 4.x or transformers-5 files
    tokenize = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    eos = ckpt.text.eos_token_id if ckpt.text.eos_token_id is not None else tokenizer.eos_token_id
    image_tokens = (ckpt.vision.image_size // ckpt.vision.patch_size) ** 2
    root = Path(opts.image_root) if opts.image_root else Path(data).expanduser().parent
    examples, problems = build_examples(read_records(data), tokenize, eos, root, max_length=opts.max_length,
                                        image_tokens=image_tokens, on_bad=opts.bad_records, source=str(data))
    return (*split_validation(examples, opts.val_split, opts.seed), problems)


def _llava_start(ckpt, mode: str, opts: TrainOptions) -> tuple:
    """(net, Llava model, batch loss) of the LLaVA family."""
    from huatuo_lite.convert.reference.build import torch_dtype

    lora = LoraOptions(opts.lora_r, opts.lora_alpha, opts.lora_dropout, opts.train_projector)
    net, llava = build_trainable(ckpt, mode, lora, torch_dtype(opts.dtype), _device(opts.device),
                                 opts.gradient_checkpointing)
    if not opts.train_vision:
        freeze_tower(llava)
    if not opts.train_embeddings:
        llava.get_input_embeddings().weight.requires_grad_(False)
    feed = ImageFeed(llava, ckpt.vision.select_layer, opts.feature_cache)
    return net, llava, lambda batch: batch_loss(llava, batch, _batch_hidden(feed, batch))


def _write_llava(ckpt, llava, out) -> Path:
    return write_checkpoint(ckpt, canonical_state(llava, ckpt), out)


LLAVA_HOOKS = FamilyHooks("llava", open_checkpoint, _examples, _llava_start, build_model, _write_llava,
                          tuple(LR_DEFAULTS), train_projector=True)


def _start_run(ckpt, mode: str, opts: TrainOptions, out: Path, steps: int, hooks: FamilyHooks) -> Run:
    from transformers import get_scheduler

    net, model, loss = hooks.start(ckpt, mode, opts)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = get_scheduler(SCHEDULES[opts.schedule], optimizer, num_training_steps=steps,
                              num_warmup_steps=int(opts.warmup_ratio * steps))
    return Run(mode, opts, out, net, model, loss, optimizer, scheduler, params)


def train(data, model, out, mode: str = "lora", **options) -> TrainResult:
    """Train `model` (an upstream folder) on `data` (PubMedVision JSON) into `out`."""
    started = time.perf_counter()
    opts = make_options(mode, options)
    out = Path(out)
    torch.manual_seed(opts.seed)
    hooks = family_hooks(model)
    ckpt = hooks.open(model)
    if mode not in hooks.modes:
        raise HuatuoError(f"Training mode {mode!r} is not offered for {ckpt.root} ({hooks.name} family): "
                          f"use --mode {' or '.join(hooks.modes)}.")
    if opts.train_projector is None:
        opts = replace(opts, train_projector=hooks.train_projector)
    train_set, val_set, problems = hooks.examples(data, ckpt, opts)
    steps = total_steps(len(train_set), opts)
    run = _start_run(ckpt, mode, opts, out, steps, hooks)
    history = {"losses": [], "val_losses": []}
    if opts.resume:
        history = _restore(run, _find_checkpoint(out, opts.resume))
    saved = _loop(run, train_set, val_set, steps, history)
    val_loss = evaluate(run, val_set) if val_set else None
    adapter_dir, model_dir = _write_outputs(out, run, ckpt, hooks)
    result = TrainResult(mode=mode, steps=steps, losses=history["losses"], val_loss=val_loss,
                         val_losses=history["val_losses"], out_dir=out, adapter_dir=adapter_dir,
                         model_dir=model_dir, checkpoints=saved, skipped=problems,
                         n_examples=len(train_set), seconds=time.perf_counter() - started)
    _write_log(out, result, opts, str(ckpt.root), str(data), hooks.name)
    return result


def _loop(run: Run, train_set: list, val_set: list, steps: int, history: dict) -> list:
    """Run the optimizer steps not yet done; returns the checkpoint folders written."""
    from tqdm import tqdm

    saved, opts = [], run.opts
    start = len(history["losses"])
    run.net.train()
    with tqdm(total=steps, initial=start, disable=not opts.progress, desc=f"train {run.mode}", unit="step") as bar:
        for step in range(start, steps):
            loss = _optimizer_step(run, train_set, step)
            if not math.isfinite(loss):
                raise HuatuoError(f"The training loss became {loss} at step {step + 1}; lower the learning rate.")
            history["losses"].append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
            bar.update(1)
            done = step + 1
            if val_set and opts.val_every and done % opts.val_every == 0:
                history["val_losses"].append((done, evaluate(run, val_set)))
            if opts.save_every and done % opts.save_every == 0:
                saved.append(_save_state(run, done, history))
    return saved
