"""An OpenAI system message becomes the Qwen2.5-VL system prompt exactly as the checkpoint's chat
template renders it (the template's default otherwise); the LLaVA family, which has none, ignores it."""
from __future__ import annotations

from qwen_helpers import LAYOUTS, user_message

from huatuo_lite.families import qwen25vl
from huatuo_lite.openai_compat import messages_to_turns
from huatuo_lite.prompt import render as llava_render

SYSTEM = "You are a careful radiologist."


def _openai(system: bool) -> list:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    return messages + [{"role": "user", "content": [{"type": "text", "text": "What is shown?"}]},
                       {"role": "assistant", "content": "A chest film."},
                       {"role": "user", "content": [{"type": "text", "text": "Any effusion?"}]}], image


def test_system_message_renders_as_the_template(qwen_processors):
    processor = qwen_processors[LAYOUTS[0]]
    for system in (True, False):
        messages, _ = _openai(system)
        turns, _ = messages_to_turns(messages)
        hf = ([{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}] if system else []) + [
            user_message(0, "What is shown?"),
            {"role": "assistant", "content": [{"type": "text", "text": "A chest film."}]},
            user_message(0, "Any effusion?")]
        want = processor.apply_chat_template(hf, add_generation_prompt=True)
        assert qwen25vl.render(turns) == want
        assert (SYSTEM in want) == system


def test_llava_ignores_the_system_message():
    with_system, _ = messages_to_turns(_openai(True)[0])
    without, _ = messages_to_turns(_openai(False)[0])
    assert llava_render(with_system) == llava_render(without)
