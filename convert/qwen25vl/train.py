"""Fine-tuning a Qwen2.5-VL folder: this family's hooks for convert/train/run.py's loop.

- Model: transformers' Qwen2_5_VLForConditionalGeneration from the folder (either tensor
  layout); module names as 4.57 has them: model.visual.{blocks,merger}, model.language_model,
  lm_head.
- lora / qlora: LoRA on the text layers' q/k/v/o/gate/up/down (LORA_TARGETS, a regex on full
  names: the vision blocks' own qkv/proj/gate/up/down stay out); the merger trains fully only
  when asked (--train-projector; off by default), the vision blocks never. qlora quantizes
  the text model's Linears to NF4 (the vision tower and lm_head stay unquantized).
- Examples: one per record, the whole conversation as the chat template renders it
  (families.qwen25vl.render: default system prompt, the record's images before its first
  question), as upstream's collate (processor.apply_chat_template) does. Labels: each answer
  and its <|im_end|> (so the model learns to stop); the system prompt, user turns,
  "<|im_start|>assistant\\n" and the "\\n" after <|im_end|> are IGNORE. Each image's
  <|image_pad|> is repeated (h/28)*(w/28) times, as the processor expands it.
- Images: fit_qwen25vl within the checkpoint's min/max_pixels, normalized, patchify ->
  patches [h/14*w/14, 1176] + grid_thw (1, h/14, w/14): the processor's pixel_values.
- Forward: model.visual's features [T_i, H] replace the pad embeddings in order; 3-D M-RoPE
  positions from families.qwen25vl.positions (get_rope_index's rule); the loss is computed
  on the trained rows only (no [B, L, V] logits).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from huatuo_lite.errors import HuatuoError
from huatuo_lite.families import qwen25vl as fam
from huatuo_lite.image import load as image_mod
from huatuo_lite.prompt import Turn, validate

from ..reference.build import torch_dtype
from ..train.data import IGNORE, DataError, Example, build_examples, read_records, split_validation
from ..train.family import FamilyHooks
from ..train.model import LoraOptions, quantize_language_model
from .checkpoint import open_qwen25vl
from .merge import write_qwen25vl

VISION = "model.visual"
MERGER = "model.visual.merger"
LM_HEAD = "lm_head"
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
QUANT_SKIP = (VISION, LM_HEAD)
MODES = ("lora", "qlora")


# ------------------------------------------------------------------ model ----
def build_model(ckpt, dtype=torch.float32):
    """transformers' own model of the folder (unquantized, eval mode)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()          # "Loading checkpoint shards": not on a command's output
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt.root), dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    return model.eval()


def lora_config(lora: LoraOptions):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                      target_modules=LORA_TARGETS, modules_to_save=[MERGER] if lora.train_projector else None)


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def start(ckpt, mode: str, opts) -> tuple:
    """(PeftModel, the Qwen2.5-VL model inside, batch loss) for run.py."""
    from peft import get_peft_model

    if mode not in MODES:
        raise HuatuoError(f"Training mode {mode!r} is not offered for Qwen2.5-VL models: use --mode lora or qlora.")
    model = build_model(ckpt, torch_dtype(opts.dtype)).to(_device(opts.device))
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "qlora":
        quantize_language_model(model, skip=QUANT_SKIP)
    lora = LoraOptions(opts.lora_r, opts.lora_alpha, opts.lora_dropout, bool(opts.train_projector))
    net = get_peft_model(model, lora_config(lora))
    if opts.gradient_checkpointing:
        model.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    feed = VisionFeed(model, ckpt.image_pixels, opts.feature_cache, lora.train_projector)
    return net, model, lambda batch: batch_loss(model, batch, feed, ckpt.ids.image)


# ------------------------------------------------------------------- data ----
class ImageGrids:
    """Image path -> merged feature grid (rows, cols) = (h/28, w/28) after smart_resize."""

    def __init__(self, pixels: tuple):
        self.fit = partial(image_mod.fit_qwen25vl, min_pixels=pixels[0], max_pixels=pixels[1])
        self.known: dict = {}

    def __call__(self, path) -> tuple:
        if path not in self.known:
            width, height = self.fit(image_mod.load_image(path)).size
            self.known[path] = (height // fam.FACTOR, width // fam.FACTOR)
        return self.known[path]


def _tokens(text: str, tokenize, pad_id: int, pads: list) -> list:
    """Token ids of `text`, each <|image_pad|> repeated by the next count in `pads` (consumed).
    Pads sit between <|vision_start|> and <|vision_end|>, so tokenizing the text between them
    equals tokenizing the whole expanded text."""
    ids: list = []
    for index, chunk in enumerate(text.split(fam.IMAGE_PAD)):
        if index:
            ids.extend([pad_id] * pads.pop(0))
        ids.extend(tokenize(chunk) if chunk else [])
    return ids


def record_example(index: int, pairs: list, images: list, *, tokenize, pad_id: int, grid_of) -> list:
    """The record's whole conversation as one Example: labels on each answer + <|im_end|>."""
    turns = [Turn(q, len(images) if i == 0 else 0, a) for i, (q, a) in enumerate(pairs)]
    validate(turns[:-1] + [Turn(turns[-1].question, turns[-1].n_images)], fam.NAME)
    marker = next((m for _, a in pairs if (m := fam.reserved_in(a))), None)
    if marker:
        raise ValueError(f"a reply contains {marker!r}, which {fam.RESERVED_MEANING}")
    pads = [rows * cols for rows, cols in map(grid_of, images)]
    ids, labels, done = [], [], ""
    for i, turn in enumerate(turns):
        opened = fam.render(turns[:i] + [Turn(turn.question, turn.n_images)])   # ends "<|im_start|>assistant\n"
        prompt = _tokens(opened[len(done):], tokenize, pad_id, pads)
        answer = tokenize(turn.answer + fam.IM_END)
        newline = tokenize("\n")
        ids += prompt + answer + newline
        labels += [IGNORE] * len(prompt) + answer + [IGNORE] * len(newline)
        done = fam.render(turns[:i + 1])
    return [Example(index, 0, ids, labels, list(images))]


def examples(data, ckpt, opts) -> tuple:
    """(train examples, validation examples, skipped problems) of the data file."""
    from ..checkpoint.tokenizer import open_tokenizer

    tokenizer = open_tokenizer(ckpt.tokenizer_dir)
    tokenize = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    make = partial(record_example, tokenize=tokenize, pad_id=ckpt.ids.image, grid_of=ImageGrids(ckpt.image_pixels))
    root = Path(opts.image_root) if opts.image_root else Path(data).expanduser().parent
    found, problems = build_examples(read_records(data), tokenize, None, root, max_length=opts.max_length,
                                     on_bad=opts.bad_records, source=str(data), make_examples=make)
    return (*split_validation(found, opts.val_split, opts.seed), problems)


# ----------------------------------------------------------------- images ----
def image_patches(path, fit) -> tuple:
    """One image file -> (patches float32 [h/14*w/14, 1176], grid_thw (1, h/14, w/14)): what
    Qwen2VLImageProcessor gives as pixel_values / image_grid_thw."""
    return fam.patchify(image_mod.pixel_values(image_mod.load_image(path), fit))


class VisionFeed:
    """Image paths -> (features [sum T_i, H] in order, grids [(rows, cols)]).

    The vision blocks are frozen, so each image's result is kept (cache_size images): the
    merged features when the merger is frozen; when it trains, the merger's input
    [h/14*w/14, D] in window order and the order back (argsort of the window index), and
    the merger runs with gradients every step (model.visual's forward, split at the merger)."""

    def __init__(self, model, pixels: tuple, cache_size: int, merger_trains: bool):
        self.visual = model.model.visual
        self.fit = partial(image_mod.fit_qwen25vl, min_pixels=pixels[0], max_pixels=pixels[1])
        self.cache_size, self.merger_trains = cache_size, merger_trains
        self.cache: dict = {}
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype

    @torch.no_grad()
    def _encode(self, path) -> tuple:
        patches, thw = image_patches(path, self.fit)                                 # [h/14*w/14, 1176]
        x = torch.from_numpy(patches).to(self.device, self.dtype)
        grid = torch.tensor([thw], device=self.device)
        rows_cols = (thw[1] // fam.MERGE_SIZE, thw[2] // fam.MERGE_SIZE)
        if not self.merger_trains:
            return self.visual(x, grid_thw=grid), rows_cols                          # [T, H]
        seen = []
        handle = self.visual.merger.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        try:
            self.visual(x, grid_thw=grid)
        finally:
            handle.remove()
        return (seen[0], torch.argsort(self.visual.get_window_index(grid)[0])), rows_cols

    def _get(self, path) -> tuple:
        if path in self.cache:
            return self.cache[path]
        found = self._encode(path)
        if self.cache_size:
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[path] = found
        return found

    def __call__(self, paths: list) -> tuple:
        found = [self._get(p) for p in paths]
        if self.merger_trains:
            features = [self.visual.merger(inputs)[order] for (inputs, order), _ in found]
        else:
            features = [rows for rows, _ in found]
        merged = torch.cat(features) if features else torch.zeros(0, 0, device=self.device)
        return merged, [grid for _, grid in found]


def spans(ids: np.ndarray, pad_id: int, grids: list) -> list:
    """Prompt ids -> families.qwen25vl.Span runs: text, and each run of pads as one image."""
    out, start, image = [], 0, 0
    is_pad = np.concatenate([[False], ids == pad_id, [False]])
    edges = np.flatnonzero(is_pad[1:] != is_pad[:-1])          # run starts / ends alternately
    for begin, end in zip(edges[::2], edges[1::2]):
        if begin > start:
            out.append(fam.Span(int(begin - start)))
        rows, cols = grids[image]
        if rows * cols != end - begin:
            raise HuatuoError(f"An image run of {end - begin} pads does not match its grid {rows}x{cols}.")
        out.append(fam.Span(int(end - begin), (rows, cols)))
        start, image = int(end), image + 1
    if len(ids) > start:
        out.append(fam.Span(int(len(ids) - start)))
    return out


def batch_loss(model, batch: list, feed: VisionFeed, pad_id: int) -> tuple:
    """(mean cross-entropy over the batch's trained tokens, their number)."""
    try:
        features, grids = feed([p for ex in batch for p in ex.images])
    except HuatuoError as err:
        raise DataError(f"Record {batch[0].record_index} (or another in its batch): {err}") from None
    device = model.get_input_embeddings().weight.device
    length = max(len(ex.input_ids) for ex in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    pos = torch.zeros(3, len(batch), length, dtype=torch.long)                        # [3, B, L]
    used = 0
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(ex.input_ids), torch.tensor(ex.labels), 1
        own = grids[used:used + len(ex.images)]
        used += len(ex.images)
        pos[:, row, :n] = torch.from_numpy(fam.positions(spans(np.asarray(ex.input_ids), pad_id, own))[0])
    ids, labels, mask, pos = ids.to(device), labels.to(device), mask.to(device), pos.to(device)
    embeds = model.get_input_embeddings()(ids)                                       # [B, L, H]
    image = (ids == pad_id) & mask.bool()
    if int(image.sum()) != features.shape[0]:
        raise HuatuoError(f"The batch holds {int(image.sum())} image pads but {features.shape[0]} image features.")
    if features.shape[0]:
        embeds = embeds.masked_scatter(image[..., None], features.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    targets = labels[:, 1:]                         # position t predicts token t + 1
    keep = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep]).float()                             # [n_trained, V]
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())


HOOKS = FamilyHooks(fam.NAME, open_qwen25vl, examples, start, build_model, write_qwen25vl, MODES,
                    train_projector=False)
