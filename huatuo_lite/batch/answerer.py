"""One model per worker process: what to open (AnswererSpec) and the answerer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .records import BatchItem
from ..errors import HuatuoError
from ..eval.run import first_letter
from ..families import generation_defaults
from ..families.common import EVAL_MAX_NEW_TOKENS, GenerationConfig
from ..families.llava import GENERATION_DEFAULTS


# item kind -> default most new tokens (eval's scorer reads one letter; the rest answer in full:
# None = the model's own max_new_tokens, its checkpoint's generation_config or its family's)
DEFAULT_MAX_TOKENS = {"eval": EVAL_MAX_NEW_TOKENS, "conversation": None, "question": None}


# -------------------------------------------------------------- answering ----
@dataclass(frozen=True)
class AnswererSpec:
    """Everything a worker needs to build its own model (picklable: sent to processes and actors)."""

    model: str
    backend: str | None = None
    load_options: dict = field(default_factory=dict)
    temperature: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None

    def config(self, kind: str, defaults: GenerationConfig | None = None) -> GenerationConfig:
        """Greedy unless asked; the rest from the model's own defaults (`defaults`)."""
        return (defaults or GENERATION_DEFAULTS).with_overrides(temperature=self.temperature, seed=self.seed,
                                                  max_new_tokens=self.max_tokens or DEFAULT_MAX_TOKENS[kind])

    def run_info(self, data) -> dict:
        """What a results file was made with; a resume must match it."""
        return {"model": str(Path(self.model).resolve()) if Path(self.model).exists() else self.model,
                "backend": self.backend, "data": str(Path(data).resolve()), "temperature": self.temperature,
                "seed": self.seed, "max_tokens": self.max_tokens,
                "options": {k: v for k, v in self.load_options.items() if k != "threads"}}  # threads may change


class Answerer:
    """One worker's model: item -> result row. Bad input of one record (a
    missing or broken image, a prompt too long) becomes that row's `error`."""

    def __init__(self, spec: AnswererSpec):
        from ..api import load

        self.spec = spec
        self.model = load(spec.model, backend=spec.backend, **spec.load_options)

    def __call__(self, item: BatchItem) -> dict:
        row = {"index": item.index, "key": item.key, "kind": item.kind, **item.extra}
        try:
            config = self.spec.config(item.kind, generation_defaults(self.model.engine))
            answer = self.model.ask(list(item.images), item.prompt, **asdict(config))
        except HuatuoError as exc:
            return {**row, "output": None, "error": str(exc)}
        row.update(output=answer.text, prompt_tokens=answer.prompt_tokens,
                   completion_tokens=answer.completion_tokens, finish_reason=answer.finish_reason)
        if item.kind == "eval":
            letter = first_letter(answer.text)
            row.update(letter=letter, correct=letter is not None and letter == item.extra.get("answer"))
        return row

    def close(self) -> None:
        self.model.close()
