"""Tool-call formats: parsers on model outputs, the grammar that forces calls, and streaming."""
from __future__ import annotations

import json

import pytest

from deployments.llm.tool_calls import (FORMATS, ToolCallStream, default_parser, parse_hermes, parse_llama3_json,
                                        parse_mistral)
from deployments.types import ToolSpec
from tests.unit.fakes import byte_grammars

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


# ----------------------------------------------------------------------------- parsers on model outputs
# Replies written the way each family's models write them (model cards, chat templates).

def _named(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_parser():
    content, calls = parse_hermes('Sure. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
                                  '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert content == "Sure." and _named(calls) == [("f", {"x": 1}), ("g", {})]
    assert parse_hermes("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    content, calls = parse_hermes('<tool_call>{"name": "f", "arguments": {"x": 2}}')   # unclosed at EOS
    assert content is None and calls[0].name == "f"
    qwen = ('<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": '
            '"San Francisco, CA, USA", "date": "2024-10-01"}}\n</tool_call>')
    assert [n for n, _ in _named(parse_hermes(qwen)[1])] == ["get_current_temperature", "get_temperature_date"]


def test_llama3_json_parser():
    content, calls = parse_llama3_json('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}')
    assert content is None and _named(calls) == [("get_weather", {"city": "Paris", "unit": "c"})]
    content, calls = parse_llama3_json('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [1]}}')
    assert content is None and _named(calls) == [("a", {}), ("b", {"x": [1]})]
    for text in ("The weather is fine.", '{"answer": 42}', '{"name": "a", "parameters": {}} and then text'):
        assert parse_llama3_json(text) == (text, [])


def test_mistral_parser():
    content, calls = parse_mistral('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},'
                                   ' {"name": "get_time", "arguments": {}}]')
    assert content is None and _named(calls) == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]
    content, calls = parse_mistral('[{"name": "get_time", "arguments": {}}]')    # the special token was dropped
    assert _named(calls) == [("get_time", {})]
    assert parse_mistral("[1, 2]") == ("[1, 2]", []) and parse_mistral("Hello") == ("Hello", [])
    cut = '[TOOL_CALLS][{"name": "get_time", "argum'
    assert parse_mistral(cut) == (cut, [])


def test_the_default_parser_follows_the_chat_template():
    assert default_parser("{{ '[TOOL_CALLS]' + tool_calls|tojson }}") == "mistral"
    assert default_parser("{{- '<|python_tag|>' }}...<|eom_id|>") == "llama3_json"
    assert default_parser("<tool_call>...</tool_call>") == "hermes" and default_parser(None) == "hermes"


# ----------------------------------------------------------------------------- the grammar

def _accepts(grammar, text: str) -> bool:
    import xgrammar as xgr
    m = xgr.GrammarMatcher(grammar)
    return m.accept_string(text) and m.accept_token(256)    # the whole text, then EOS


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_named_choice_admits_exactly_one_valid_call_of_that_function(fmt):
    f = FORMATS[fmt]
    grammar = byte_grammars().compile(f.structural_tag(ToolSpec([WEATHER, TIME], "get_weather")))
    call = f.call_begin("get_weather") + '{"city": "Paris", "unit": "c"}}' + f.call_end
    assert _accepts(grammar, f.list_begin + call + f.list_end)
    assert f.parse(f.list_begin + call + f.list_end)[1][0].name == "get_weather"    # the parser reads it back
    for bad in ('{"city": "Paris", "unit": "kelvin"}}', '{"city": "Paris"}}', '{"x": 1}}', '"Paris"}'):
        assert not _accepts(grammar, f.list_begin + f.call_begin("get_weather") + bad + f.call_end + f.list_end)
    time = f.call_begin("get_time") + "{}}" + f.call_end
    assert not _accepts(grammar, f.list_begin + time + f.list_end)                   # another function
    assert not _accepts(grammar, f.list_begin + call + f.separator + call + f.list_end)   # a second call
    assert not _accepts(grammar, "Sure! " + f.list_begin + call + f.list_end)       # text before it
    assert not _accepts(grammar, "")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_required_admits_one_or_more_calls_or_exactly_one_without_parallel_calls(fmt):
    f = FORMATS[fmt]
    weather = f.call_begin("get_weather") + '{"city": "Oslo", "unit": "f"}}' + f.call_end
    time = f.call_begin("get_time") + "{}}" + f.call_end
    two = f.list_begin + weather + f.separator + time + f.list_end
    parallel = byte_grammars().compile(f.structural_tag(ToolSpec([WEATHER, TIME], "required")))
    assert _accepts(parallel, f.list_begin + time + f.list_end) and _accepts(parallel, two)
    assert [c.name for c in f.parse(two)[1]] == ["get_weather", "get_time"]
    assert not _accepts(parallel, "no call at all") and not _accepts(parallel, f.list_begin + f.list_end)
    assert not _accepts(parallel, f.list_begin + f.call_begin("get_time") + '{"extra": 1}}' + f.call_end + f.list_end)
    single = byte_grammars().compile(f.structural_tag(ToolSpec([WEATHER, TIME], "required", parallel=False)))
    assert _accepts(single, f.list_begin + weather + f.list_end) and not _accepts(single, two)


def test_without_parameters_a_function_takes_no_arguments():
    f = FORMATS["hermes"]
    grammar = byte_grammars().compile(f.structural_tag(ToolSpec([TIME], "get_time")))
    assert _accepts(grammar, f.call_begin("get_time") + "{}}" + f.call_end)
    assert not _accepts(grammar, f.call_begin("get_time") + '{"tz": "UTC"}}' + f.call_end)


# ----------------------------------------------------------------------------- streaming

def _feed(split, pieces):
    """Content per piece; the tool-call deltas go to split.sent."""
    split.sent = getattr(split, "sent", [])
    out = []
    for p in pieces:
        text, deltas = split.push(p)
        out.append(text)
        split.sent += deltas
    return out


def _streamed_calls(deltas):
    """What a client accumulates from the deltas, as OpenAI's SDK does: {index: [id, name, arguments]}."""
    calls = {}
    for d in deltas:
        c = calls.setdefault(d.index, [None, None, ""])
        if d.id is not None:
            c[0], c[1] = d.id, d.name
        c[2] += d.arguments
    return calls


def test_tool_call_stream_passes_plain_content_through_at_once():
    split = ToolCallStream()
    assert _feed(split, ["Hel", "lo", " world"]) == ["Hel", "lo", " world"]
    assert split.sent == []
    assert split.finish() == ("", [], [])


def test_tool_call_stream_sends_the_name_then_argument_fragments_as_they_come():
    split = ToolCallStream()
    out = _feed(split, ["Sure. <to", "ol_call>\n{\"name\": \"get_", "weather\", ", "\"arguments\": {\"city\": ",
                        "\"Pa", "ris\"}", "}\n</tool_call>"])
    assert out == ["Sure. ", "", "", "", "", "", ""]     # "<to" is held until it is known to be the tag
    first = split.sent[0]
    assert (first.index, first.name, first.arguments) == (0, "get_weather", "") and first.id.startswith("call_")
    fragments = [d.arguments for d in split.sent[1:]]
    assert fragments == ['{"city": ', '"Pa', 'ris"}']    # streamed as generated; the outer brace is not
    content, calls, more = split.finish()
    assert content == "" and more == []
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [(first.id, "get_weather", {"city": "Paris"})]
    assert json.loads(_streamed_calls(split.sent)[0][2]) == {"city": "Paris"}


def test_tool_call_stream_streams_several_calls_with_their_indices():
    split = ToolCallStream()
    text = ('<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    _feed(split, [text[i:i + 3] for i in range(0, len(text), 3)])
    streamed = _streamed_calls(split.sent)
    assert [(v[1], json.loads(v[2])) for v in streamed.values()] == [("a", {"x": [1, {"y": "}"}]}), ("b", {})]
    content, calls, more = split.finish()
    assert content == "" and more == [] and [c.name for c in calls] == ["a", "b"]


@pytest.mark.parametrize("fmt", ["llama3_json", "mistral"])
def test_other_formats_stream_their_calls_too(fmt):
    f = FORMATS[fmt]
    text = (f.list_begin + f.call_begin("a") + '{"x": [1, 2]}}' + f.call_end + f.separator
            + f.call_begin("b") + "{}}" + f.call_end + f.list_end)
    split = ToolCallStream(f)
    assert "".join(_feed(split, [text[i:i + 2] for i in range(0, len(text), 2)])) == ""
    streamed = _streamed_calls(split.sent)
    content, calls, more = split.finish()
    assert content == "" and more == []
    assert [(v[0], v[1], json.loads(v[2])) for v in streamed.values()] == [
        (c.id, c.name, json.loads(c.arguments)) for c in calls] and [c.name for c in calls] == ["a", "b"]


def test_tool_call_stream_releases_a_false_tag_start_and_bad_json_as_content():
    split = ToolCallStream()
    assert _feed(split, ["a <t", "able>"]) == ["a ", "<table>"]
    bad = ToolCallStream()
    assert _feed(bad, ["<tool_call>{not json"]) == [""]
    assert bad.sent == [] and bad.finish() == ("<tool_call>{not json", [], [])


def test_tool_call_stream_sends_string_arguments_decoded_at_the_end():
    split = ToolCallStream()
    _feed(split, ['<tool_call>{"name": "f", "arguments": "{\\"x\\": ', '1}"}</tool_call>'])
    assert [(d.name, d.arguments) for d in split.sent] == [("f", "")]
    content, calls, more = split.finish()
    assert [(d.index, d.arguments) for d in more] == [(0, '{"x": 1}')] and calls[0].arguments == '{"x": 1}'


def test_tool_call_stream_sends_a_layout_it_could_not_stream_at_the_end():
    split = ToolCallStream()
    _feed(split, ['<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'])   # name after arguments
    assert split.sent == []
    content, calls, more = split.finish()
    assert content == "" and calls[0].name == "f"
    assert [(d.index, d.name, json.loads(d.arguments)) for d in more] == [(0, "f", {"x": 1})]


def test_a_reply_cut_inside_a_call_leaves_no_call_syntax_in_the_content():
    split = ToolCallStream()
    out = _feed(split, ['Sure. <tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g'])
    content, calls, _ = split.finish(cut=True)
    assert out == ["Sure. "] and content == "" and [(c.name, c.arguments) for c in calls] == [("a", "{}")]
    uncut = ToolCallStream()
    _feed(uncut, ['<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call> <tool_call>{"name": "g'])
    assert uncut.finish()[0] == '<tool_call>{"name": "g'     # not cut: the model ended there, it is content
