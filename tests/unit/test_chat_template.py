"""Chat rendering: the template, tools offered natively or in a system prompt, earlier tool turns."""
from __future__ import annotations

import pytest

from deployments.errors import InvalidRequestError
from deployments.llm.chat_template import render_chat
from deployments.llm.tool_calls import FORMATS
from deployments.types import ToolSpec
from tests.unit.fakes import ByteTokenizer

TOOL_TURNS = [{"role": "user", "content": "w?"},
              {"role": "assistant", "tool_calls": [{"id": "call_7", "type": "function",
                                                    "function": {"name": "f", "arguments": '{"a": 1}'}}]},
              {"role": "tool", "tool_call_id": "call_7", "content": "sunny"}]

NATIVE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}"
          "{% for c in m.tool_calls or [] %}[call {{ c.id }} {{ c.function.name }} {{ c.function.arguments.a }}]{% endfor %}"
          "{% if m.tool_call_id %}[result of {{ m.tool_call_id }}]{% endif %}{% endfor %}"
          "{% if tools %}[tools: {% for t in tools %}{{ t.function.name }}{% endfor %}]{% endif %}<assistant>")


def test_render_chat_uses_template_and_tools_system_prompt():
    tok = ByteTokenizer()
    tools = ToolSpec([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}], "auto")
    text = render_chat(tok, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tools)
    assert text.startswith("<system>") and "get_weather" in text and text.endswith("<user>hi<assistant>")
    assert '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>' in text   # the Hermes example


def test_the_system_prompt_shows_the_configured_format():
    tok = ByteTokenizer()
    tools = ToolSpec([{"type": "function", "function": {"name": "g"}}], "auto")
    assert '{"name": "f", "parameters": {"x": 1}}' in render_chat(tok, [{"role": "user", "content": "x"}], tools,
                                                                   FORMATS["llama3_json"])
    assert '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]' in render_chat(
        tok, [{"role": "user", "content": "x"}], tools, FORMATS["mistral"])


def test_forced_tool_choice_leaves_the_prompt_alone():
    """The grammar, not a prompt prefix, forces the call (structured.py)."""
    tok = ByteTokenizer()
    named = ToolSpec([{"type": "function", "function": {"name": "f"}}], "f")
    assert render_chat(tok, [{"role": "user", "content": "x"}], named).endswith("<user>x<assistant>")


def test_assistant_tool_calls_and_tool_results_are_rendered_as_text():
    text = render_chat(ByteTokenizer(), TOOL_TURNS, None)
    assert '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    mistral = render_chat(ByteTokenizer(), TOOL_TURNS, None, FORMATS["mistral"])
    assert '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]' in mistral


def test_a_template_that_knows_tools_gets_the_calls_with_their_ids_and_the_results():
    tok = ByteTokenizer()
    tok.chat_template = NATIVE
    tools = ToolSpec([{"type": "function", "function": {"name": "f"}}], "auto")
    text = render_chat(tok, TOOL_TURNS, tools)
    assert "[call call_7 f 1]" in text and "<tool>sunny[result of call_7]" in text
    assert text.endswith("[tools: f]<assistant>") and "<system>" not in text


def test_model_without_template_is_a_clear_400():
    tok = ByteTokenizer()
    tok.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        render_chat(tok, [{"role": "user", "content": "x"}], None)
