"""Incremental detokenization, stop strings, chat rendering and tool-call parsing."""
from __future__ import annotations

import json

import pytest

from deployments.errors import InvalidRequestError
from deployments.llm.detokenizer import IncrementalDetokenizer, StopMatcher
from deployments.llm.prompts import parse_tool_calls, render_chat
from deployments.types import ToolSpec
from tests.unit.fakes import ByteTokenizer


def test_detokenizer_never_splits_a_utf8_character():
    tok = ByteTokenizer()
    text = "héllo wörld 🙂!"
    detok = IncrementalDetokenizer(tok, list(b"prompt"))
    deltas = [detok.push(b) for b in text.encode()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[list(text.encode()).index(0xF0)] == ""   # first byte of the emoji: held


def test_stop_matcher_holds_back_partial_matches_and_cuts():
    m = StopMatcher(["STOP"])
    out = []
    for piece in ["Hello ", "wor", "ld S", "TO", "P and more"]:
        m.append(piece)
        out.append(m.take_ready(final=False))
    assert out[2] == "ld "             # 'S' might start 'STOP': held back
    assert m.stopped and m.text == "Hello world "
    assert "".join(out) + m.take_ready(final=True) == "Hello world "


def test_stop_matcher_releases_held_text_when_it_turns_out_harmless():
    m = StopMatcher(["</end>"])
    m.append("a </e")
    assert m.take_ready(final=False) == "a "
    m.append("xtra")
    assert m.take_ready(final=False) == "</extra"
    assert m.take_ready(final=True) == ""


def test_render_chat_uses_template_and_tools_system_prompt():
    tok = ByteTokenizer()
    tools = ToolSpec([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}], "auto")
    text, prefix = render_chat(tok, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tools)
    assert text.startswith("<system>") and "get_weather" in text and text.endswith("<user>hi<assistant>")
    assert prefix == ""


def test_forced_tool_choice_prefixes_the_reply():
    tok = ByteTokenizer()
    named = ToolSpec([{"type": "function", "function": {"name": "f"}}], "f")
    text, prefix = render_chat(tok, [{"role": "user", "content": "x"}], named)
    assert text.endswith(prefix) and '"name": "f"' in prefix
    required = ToolSpec([{"type": "function", "function": {"name": "f"}}], "required")
    assert render_chat(tok, [{"role": "user", "content": "x"}], required)[1].startswith("<tool_call>")


def test_assistant_tool_calls_and_tool_results_are_rendered_as_text():
    tok = ByteTokenizer()
    msgs = [{"role": "user", "content": "w?"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                  "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text, _ = render_chat(tok, msgs, None)
    assert '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_parse_tool_calls():
    content, calls = parse_tool_calls('Sure. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
                                      '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert content == "Sure." and [c.name for c in calls] == ["f", "g"]
    assert json.loads(calls[0].arguments) == {"x": 1}
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    content, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 2}}')   # unclosed at EOS
    assert content is None and calls[0].name == "f"


def test_model_without_template_is_a_clear_400():
    tok = ByteTokenizer()
    tok.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        render_chat(tok, [{"role": "user", "content": "x"}], None)


def _byte_level_bpe(merges: list[tuple[str, str]]):
    """A tiny byte-level BPE tokenizer (GPT-2 style) built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_logprob_bytes_of_a_token_that_is_half_a_character():
    from deployments.llm.detokenizer import token_text
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    u = bytes_to_unicode()
    euro = "€".encode()                                    # e2 82 ac
    tok = _byte_level_bpe([(u[euro[0]], u[euro[1]])])      # one token for e2 82, one for ac
    ids = tok("€", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    parts = [token_text(tok, i) for i in ids]
    assert parts[0][1] == [0xE2, 0x82] and parts[1][1] == [0xAC]
    assert bytes(parts[0][1] + parts[1][1]).decode() == "€"   # the bytes join into the real text
    assert token_text(tok, tok("a", add_special_tokens=False)["input_ids"][0]) == ("a", [97])


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
    from deployments.llm.prompts import ToolCallStream
    split = ToolCallStream()
    assert _feed(split, ["Hel", "lo", " world"]) == ["Hel", "lo", " world"]
    assert split.sent == []
    assert split.finish() == ("", [], [])


def test_tool_call_stream_sends_the_name_then_argument_fragments_as_they_come():
    from deployments.llm.prompts import ToolCallStream
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
    from deployments.llm.prompts import ToolCallStream
    split = ToolCallStream()
    text = ('<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    _feed(split, [text[i:i + 3] for i in range(0, len(text), 3)])
    streamed = _streamed_calls(split.sent)
    assert [(v[1], json.loads(v[2])) for v in streamed.values()] == [("a", {"x": [1, {"y": "}"}]}), ("b", {})]
    content, calls, more = split.finish()
    assert content == "" and more == [] and [c.name for c in calls] == ["a", "b"]


def test_tool_call_stream_releases_a_false_tag_start_and_bad_json_as_content():
    from deployments.llm.prompts import ToolCallStream
    split = ToolCallStream()
    assert _feed(split, ["a <t", "able>"]) == ["a ", "<table>"]
    bad = ToolCallStream()
    assert _feed(bad, ["<tool_call>{not json"]) == [""]
    assert bad.sent == [] and bad.finish() == ("<tool_call>{not json", [], [])


def test_tool_call_stream_with_a_forced_prefix_starts_inside_the_call():
    from deployments.llm.prompts import ToolCallStream
    split = ToolCallStream('<tool_call>\n{"name": "f", "arguments": ')
    assert _feed(split, ['{"x": 1}}', "\n</tool_call>"]) == ["", ""]
    assert [(d.name, d.arguments) for d in split.sent] == [("f", ""), (None, '{"x": 1}')]
    content, calls, _ = split.finish()
    assert content == "" and calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 1}


def test_tool_call_stream_sends_string_arguments_decoded_at_the_end():
    from deployments.llm.prompts import ToolCallStream
    split = ToolCallStream()
    _feed(split, ['<tool_call>{"name": "f", "arguments": "{\\"x\\": ', '1}"}</tool_call>'])
    assert [(d.name, d.arguments) for d in split.sent] == [("f", "")]
    content, calls, more = split.finish()
    assert [(d.index, d.arguments) for d in more] == [(0, '{"x": 1}')] and calls[0].arguments == '{"x": 1}'


def test_tool_call_stream_sends_a_layout_it_could_not_stream_at_the_end():
    from deployments.llm.prompts import ToolCallStream
    split = ToolCallStream()
    _feed(split, ['<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'])   # name after arguments
    assert split.sent == []
    content, calls, more = split.finish()
    assert content == "" and calls[0].name == "f"
    assert [(d.index, d.name, json.loads(d.arguments)) for d in more] == [(0, "f", {"x": 1})]
