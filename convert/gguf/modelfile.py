"""An Ollama Modelfile for a converted GGUF folder, derived from huatuo_lite/families/llava.py.

    ollama create huatuogpt-vision-7b -f Modelfile      (run in the converted folder)

Two FROM lines (the text GGUF, then the mmproj) are how Ollama imports a model with its
projector. How Ollama hands images to the template (server/prompt.go, chatPrompt): each
image of a message becomes a tag "[img-N]" (N counts the conversation's images from 0)
*prepended* to the message's content with no separator, and its llama.cpp runner splices
the image's features where the tag is. Upstream writes "<image>\\n" per image at the front
of the turn, so the TEMPLATE moves past one tag per image of the message and writes the
newline that upstream's IMAGE_LINE has after the placeholder. Go templates have no string
functions beyond len/slice/eq, so a tag is recognised by its fixed width: the model takes
at most family.MAX_IMAGES images, so N is one digit ("[img-0]" .. "[img-5]").

What the TEMPLATE does not do that upstream does: strip the question's surrounding
whitespace (Go templates cannot trim). PARAMETER lines are upstream's sampling defaults
(family.GenerationConfig); Ollama's repeat_penalty, like llama.cpp's, also counts the
prompt's last repeat_last_n tokens, where upstream (HF generate on inputs_embeds)
penalises only generated tokens.
"""
from __future__ import annotations

from pathlib import Path

from huatuo_lite.families.llava import (ANSWER_SUFFIX, ASSISTANT_TAG, GENERATION_DEFAULTS, IMAGE_LINE, IMAGE_PLACEHOLDER,
                                MAX_IMAGES, USER_TAG)

MODELFILE = "Modelfile"
OLLAMA_TAG_PREFIX = "[img-"                               # fmt.Sprintf("[img-%d]", id) in Ollama
OLLAMA_TAG_WIDTH = len(f"{OLLAMA_TAG_PREFIX}{MAX_IMAGES - 1}]")   # 7: ids 0..MAX_IMAGES-1
AFTER_IMAGE = IMAGE_LINE[len(IMAGE_PLACEHOLDER):]          # "\n": what upstream writes after <image>


def _go(s: str) -> str:
    """A Go interpreted string literal (only what the template needs: no escapes inside)."""
    assert '"' not in s and "\\" not in s and "\n" not in s, s
    return f'"{s}"'


def go_template() -> str:
    """Upstream's prompt as an Ollama (Go text/template) TEMPLATE over .Messages."""
    width, prefix = OLLAMA_TAG_WIDTH, _go(OLLAMA_TAG_PREFIX)
    is_tag = f"and (ge (len $rest) {width}) (eq (slice $rest 0 {len(OLLAMA_TAG_PREFIX)}) {prefix})"
    return (
        '{{- range .Messages }}{{ if eq .Role "user" }}' + USER_TAG
        + "{{ $rest := .Content }}{{ range .Images }}"
        + f"{{{{ if {is_tag} }}}}{{{{ slice $rest 0 {width} }}}}" + AFTER_IMAGE
        + f"{{{{ $rest = slice $rest {width} }}}}{{{{ end }}}}{{{{ end }}}}"
        + "{{ $rest }}\n" + ASSISTANT_TAG
        + '{{ else if eq .Role "assistant" }}{{ .Content }}' + ANSWER_SUFFIX
        + "{{ end }}{{ end }}"
    )


def parameters(n_ctx: int, stops: list[str]) -> list[tuple[str, object]]:
    """(name, value) PARAMETER lines: upstream's sampling defaults, context and stop strings."""
    g = GENERATION_DEFAULTS
    rows = [("temperature", g.temperature), ("top_k", g.top_k), ("top_p", g.top_p),
            ("min_p", 0.0),   # HF generate has no min-p; Ollama's default would add one
            ("repeat_penalty", g.repetition_penalty), ("num_predict", g.max_new_tokens), ("num_ctx", n_ctx)]
    return rows + [("stop", f'"{s}"') for s in stops]


def modelfile_text(text_file: str, mmproj_file: str, n_ctx: int, stops: list[str], other_quants=()) -> str:
    template = go_template()
    assert '"""' not in template
    lines = ["# Ollama: run `ollama create NAME -f Modelfile` in this folder (written by huatuo-lite convert gguf).",
             "# Stock llama.cpp (and so Ollama) computes LLaVA image features wrongly until its class-token",
             "# defect is fixed (see native/README.md): image answers from Ollama will differ from huatuo-lite's."]
    if other_quants:
        lines.append(f"# Other text quants in this folder: {', '.join(other_quants)} (change the first FROM).")
    lines += [f"FROM ./{text_file}", f"FROM ./{mmproj_file}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER {name} {value}" for name, value in parameters(n_ctx, stops)]
    return "\n".join(lines) + "\n"


def eos_texts(text_gguf: Path) -> list[str]:
    """The text of the end-of-sequence token(s) stored in a text GGUF (Ollama's stop strings)."""
    from gguf import GGUFReader

    reader = GGUFReader(text_gguf)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    ids = [reader.fields[k].contents() for k in ("tokenizer.ggml.eos_token_id",) if k in reader.fields]
    return [tokens[i] for i in ids]


def write_modelfile(folder: Path, text_file: str, mmproj_file: str, n_ctx: int, other_quants=()) -> Path:
    path = Path(folder) / MODELFILE
    text = modelfile_text(text_file, mmproj_file, n_ctx, eos_texts(Path(folder) / text_file), other_quants)
    path.write_text(text, encoding="utf-8")
    return path
