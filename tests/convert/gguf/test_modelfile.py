"""What a converted GGUF folder carries for other tools: the Ollama Modelfile (its TEMPLATE
renders upstream's prompt), the Hugging Face model card and the GGUF general.* keys.

The TEMPLATE is rendered two ways: by tests/support/gotemplate_subset.py (always; a small evaluator
of the Go template subset the TEMPLATE uses) and by Go's own text/template when `go` is on
PATH. What is emulated, not run: Ollama itself - its chatPrompt prepends "[img-N]" per image
to the message's content (server/prompt.go), which the tests do by hand before rendering.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from support.engines import skip_without
skip_without('torch', 'gguf', 'llama_cpp')
from support.gotemplate_subset import render as render_go_subset

from huatuo_lite.convert.gguf.modelfile import go_template, modelfile_text
from huatuo_lite.families.llava import GENERATION_DEFAULTS, IMAGE_PLACEHOLDER
from huatuo_lite.prompt import Turn, render

GO_MAIN = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
	Images  [][]byte
}

func main() {
	src, _ := os.ReadFile(os.Args[1])
	var msgs []*Message
	if err := json.NewDecoder(os.Stdin).Decode(&msgs); err != nil {
		panic(err)
	}
	t := template.Must(template.New("").Option("missingkey=zero").Parse(string(src)))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": msgs}); err != nil {
		panic(err)
	}
}
"""

TURNS = [Turn("What is it?", 2, "A lung."), Turn("And now?", 1)]


def ollama_messages(turns) -> list[dict]:
    """The messages Ollama's chatPrompt hands the template: "[img-N]" tags (N counting the
    conversation's images) prepended to each message's content, no separator."""
    messages, n = [], 0
    for turn in turns:
        tags = "".join(f"[img-{n + i}]" for i in range(turn.n_images))
        messages.append({"Role": "user", "Content": tags + turn.question, "Images": ["eA=="] * turn.n_images})
        n += turn.n_images
        if turn.answer is not None:
            messages.append({"Role": "assistant", "Content": turn.answer, "Images": None})
    return messages


def upstream_with_tags(turns) -> str:
    """render()'s prompt with each <image> replaced by the tag Ollama's runner splices at."""
    parts = render(turns).split(IMAGE_PLACEHOLDER)
    return "".join(p + (f"[img-{i}]" if i < len(parts) - 1 else "") for i, p in enumerate(parts))


def test_template_renders_upstream_prompt_in_the_go_subset():
    messages = ollama_messages(TURNS)
    assert render_go_subset(go_template(), {"Messages": messages}) == upstream_with_tags(TURNS)
    one = [Turn("What abnormality is seen?", 1)]
    assert render_go_subset(go_template(), {"Messages": ollama_messages(one)}) == upstream_with_tags(one)
    # a user who placed the tag in the text ([img] replaced in place) is left as written
    placed = [{"Role": "user", "Content": "Look: [img-0]", "Images": ["eA=="]}]
    assert render_go_subset(go_template(), {"Messages": placed}) == render([Turn("Look: [img-0]")])


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain on PATH (apt-get install golang-go)")
def test_template_renders_upstream_prompt_in_real_go(tmp_path):
    """Go's own text/template (what Ollama runs) gives the same text as the subset evaluator."""
    (tmp_path / "main.go").write_text(GO_MAIN)
    (tmp_path / "t.tmpl").write_text(go_template())
    subprocess.run(["go", "mod", "init", "gotmpl"], cwd=tmp_path, check=True, capture_output=True)
    done = subprocess.run(["go", "run", "main.go", "t.tmpl"], cwd=tmp_path, input=json.dumps(ollama_messages(TURNS)),
                          capture_output=True, text=True, timeout=300, env={**os.environ, "GOFLAGS": "-mod=mod",
                                                                              "GOCACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert done.stdout == upstream_with_tags(TURNS)


def test_modelfile_parameters_are_upstream_defaults():
    text = modelfile_text("M-Q8_0.gguf", "mmproj-M-F16.gguf", 4096, ["<|endoftext|>"])
    lines = text.splitlines()
    assert [x for x in lines if x.startswith("FROM")] == ["FROM ./M-Q8_0.gguf", "FROM ./mmproj-M-F16.gguf"]
    params = dict(x.split(" ", 2)[1:] for x in lines if x.startswith("PARAMETER") and " stop " not in x)
    g = GENERATION_DEFAULTS
    assert {k: float(v) for k, v in params.items()} == {
        "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p, "min_p": 0.0,
        "repeat_penalty": g.repetition_penalty, "num_predict": g.max_new_tokens, "num_ctx": 4096}
    assert 'PARAMETER stop "<|endoftext|>"' in lines
    assert f'TEMPLATE """{go_template()}"""' in text


def test_converted_folder_has_modelfile_card_and_general_keys(tiny_7b, tmp_path):
    from gguf import GGUFReader

    from huatuo_lite.convert.gguf.export import export_gguf
    from huatuo_lite.manifest import read_manifest

    out = tmp_path / "out"
    export_gguf(tiny_7b, out, quant="Q8_0", vision_onnx=False, threads=1, name="HuatuoGPT-Vision-7B")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["HuatuoGPT-Vision-7B-Q8_0.gguf", "Modelfile", "README.md", "manifest.json",
                     "mmproj-HuatuoGPT-Vision-7B-F16.gguf"]
    text = GGUFReader(out / "HuatuoGPT-Vision-7B-Q8_0.gguf")
    eos = text.fields["tokenizer.ggml.tokens"].contents()[text.fields["tokenizer.ggml.eos_token_id"].contents()]
    modelfile = (out / "Modelfile").read_text()
    assert f'PARAMETER stop "{eos}"' in modelfile and "FROM ./HuatuoGPT-Vision-7B-Q8_0.gguf" in modelfile
    for name in ("HuatuoGPT-Vision-7B-Q8_0.gguf", "mmproj-HuatuoGPT-Vision-7B-F16.gguf"):
        fields = GGUFReader(out / name).fields
        general = {k: fields[k].contents() for k in fields if k.startswith("general.")}
        assert general["general.name"] == "HuatuoGPT-Vision-7B"
        assert general["general.basename"] == "HuatuoGPT-Vision" and general["general.size_label"] == "7B"
        assert general["general.license"] == "apache-2.0"
        assert general["general.base_model.count"] == 1
        assert general["general.base_model.0.organization"] == "FreedomIntelligence"
        assert general["general.base_model.0.repo_url"] == "https://huggingface.co/FreedomIntelligence/HuatuoGPT-Vision-7B"
        assert general["general.quantized_by"].startswith("huatuo-lite ")
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "license: apache-2.0\n" in front and "pipeline_tag: image-text-to-text\n" in front
    assert "library_name: gguf\n" in front and "base_model: FreedomIntelligence/HuatuoGPT-Vision-7B\n" in front
    assert "| `HuatuoGPT-Vision-7B-Q8_0.gguf` | text | Q8_0 |" in card
    assert read_manifest(out)["name"] == "HuatuoGPT-Vision-7B"


def test_size_label_from_parameters_when_the_name_has_none(tiny_7b, tmp_path):
    from huatuo_lite.convert.checkpoint.read import open_checkpoint
    from huatuo_lite.convert.model_meta import model_meta, parameter_count

    from gguf.utility import size_label

    ckpt = open_checkpoint(tiny_7b)
    meta = model_meta(ckpt, "huatuo-lite-demo", base_repo=None)
    assert meta.basename == "huatuo-lite-demo" and meta.size_label == size_label(parameter_count(ckpt), 0, 0, 0)
    assert meta.base_repo is None


def test_self_test_verdict_sentences():
    from huatuo_lite.llama_tools import self_test_verdict

    failed = self_test_verdict({"passed": False, "min_cosine": -0.19, "mean_cosine": 0.2})
    assert "failed (min cosine -0.1900, mean 0.2000)" in failed and "huatuo-lite uses vision.onnx" in failed
    assert "stock llama.cpp/Ollama image answers will be wrong" in failed
    assert self_test_verdict({"passed": True, "min_cosine": 0.9999, "mean_cosine": 1.0}).startswith(
        "Image-path self-test: passed")
    assert "not run" in self_test_verdict(None)
    assert "could not run (OSError: x)" in self_test_verdict({"passed": False, "error": "OSError: x"})
