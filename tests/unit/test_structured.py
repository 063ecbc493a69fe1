"""Grammar-constrained decoding (structured.py) through the engine."""
from __future__ import annotations

import json

import pytest

from tests.unit.fakes import tiny_llama
from tests.unit.llm_helpers import make_engine, req, run_all


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _byte_grammar(schema):
    import json as _json

    import xgrammar as xgr
    info = xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b""], xgr.VocabType.RAW, vocab_size=257,
                             stop_token_ids=[256])
    return xgr.GrammarCompiler(info).compile_json_schema(_json.dumps(schema), any_whitespace=False)


def test_response_format_grammar_makes_even_a_random_model_answer_the_schema(model):
    import json as _json
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
              "required": ["color", "ok"], "additionalProperties": False}
    grammar = _byte_grammar(schema)
    reqs = [req("g", "answer in json", max_tokens=60), req("s", "answer", temperature=1.0, seed=3, n=2, max_tokens=60),
            req("free", "no grammar", max_tokens=20)]
    for r in reqs[:2]:
        r.grammar = grammar
    engine = make_engine(model, max_prefill_tokens=8)         # the requests join over several (mixed) steps
    texts, reasons, _ = run_all(engine, reqs)
    for rid, n in (("g", 1), ("s", 2)):
        for i in range(n):
            obj = _json.loads(texts[rid][i])
            assert set(obj) == {"color", "ok"} and obj["color"] in ("red", "green") and isinstance(obj["ok"], bool)
            assert reasons[rid][i] == "stop"
    unconstrained = texts["free"][0]
    try:
        _json.loads(unconstrained)
        constrained_by_chance = True
    except ValueError:
        constrained_by_chance = False
    assert not constrained_by_chance            # the random model's free text is no JSON: the mask did it


def test_json_object_allows_any_json_object_and_nothing_else():
    """response_format json_object is OpenAI's JSON mode: an object. xgrammar's built-in JSON grammar also
    lets an array through (the 135M model answered "[null]")."""
    import xgrammar as xgr

    from tests.unit.fakes import byte_grammars
    grammar = byte_grammars().compile({"type": "json_object"})

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return all(matcher.accept_token(b) for b in text.encode()) and matcher.accept_token(256)   # 256: EOS
    assert accepts('{"name": "Ann", "age": 30}') and accepts('{"a": [1, {"b": null}], "c": "\\u00e9"}')
    assert accepts("{}")
    assert not any(accepts(t) for t in ("[null]", "[]", '"x"', "3", "null", '{"a": 1'))


def _accepts(grammar, text: str) -> bool:
    """Whether a grammar over the byte vocabulary takes `text` and then EOS (256)."""
    import xgrammar as xgr
    matcher = xgr.GrammarMatcher(grammar)
    return all(matcher.accept_token(b) for b in text.encode()) and matcher.accept_token(256)


def test_structured_outputs_regex_choice_and_grammars_admit_exactly_their_language():
    """vLLM's structured_outputs: regex, choice (any characters, quotes and non-ASCII included), and
    grammar as EBNF (told by its '::=') or Lark."""
    from tests.unit.fakes import byte_grammars
    g = byte_grammars()
    regex = g.compile({"type": "regex", "regex": r"[0-9]{3}-[a-z]+", "param": "structured_outputs"})
    assert _accepts(regex, "123-abc") and not _accepts(regex, "12-abc") and not _accepts(regex, "123-")
    choices = ["yes", 'say "no"\\', "a\nb", "é😀", ""]
    choice = g.compile({"type": "choice", "choice": choices})
    assert all(_accepts(choice, c) for c in choices)
    assert not any(_accepts(choice, c) for c in ("ye", "yes!", "no", "say no"))
    ebnf = g.compile({"type": "grammar", "grammar": 'root ::= "n=" [0-9]+'})
    assert _accepts(ebnf, "n=42") and not _accepts(ebnf, "n=")
    lark = g.compile({"type": "grammar", "grammar": 'start: "up" | "down"'})
    assert _accepts(lark, "down") and not _accepts(lark, "left")


def test_structured_outputs_structural_tags_in_either_form_admit_exactly_their_language():
    """vLLM's structured_outputs.structural_tag: xgrammar's format (here one tag the whole output must
    be), and the legacy structures-and-triggers form (free text; after a trigger, one structure)."""
    from ingress.protocol.common import StructuredOutputs
    from tests.unit.fakes import byte_grammars
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
            "additionalProperties": False}

    def compiled(tag):
        so = StructuredOutputs.model_validate({"structural_tag": tag})
        so.check()
        return byte_grammars().compile(so.spec())
    whole = compiled({"type": "structural_tag", "format": {"type": "tag", "begin": "<w>", "end": "</w>",
                                                           "content": {"type": "json_schema", "json_schema": city}}})
    assert _accepts(whole, '<w>{"city": "Paris"}</w>')
    assert not any(_accepts(whole, t) for t in ('<w>{"city": 1}</w>', '{"city": "Paris"}', 'Paris'))
    legacy = compiled(json.dumps({"structures": [{"begin": "<f=weather>", "schema": city, "end": "</f>"}],
                                  "triggers": ["<f="]}))
    assert _accepts(legacy, 'Let me look. <f=weather>{"city": "Paris"}</f> Done.') and _accepts(legacy, "no call")
    assert not _accepts(legacy, 'x <f=weather>{"town": "Paris"}</f>') and not _accepts(legacy, "x <f=time>{}</f>")


@pytest.mark.parametrize("so,accepted", [
    ({}, [True, False, False, False]),
    ({"disable_any_whitespace": True, "disable_additional_properties": True}, [True, False, False, False]),
    ({"disable_any_whitespace": False}, [True, True, False, True]),
    ({"disable_additional_properties": False}, [True, False, True, False]),
])
def test_structured_outputs_json_style_flags_decide_whitespace_and_unnamed_properties(so, accepted):
    """vLLM's disable_any_whitespace and disable_additional_properties; here both default to true
    (single spaces, nothing the schema does not name), and false loosens each. They reach JSON inside
    a structural tag too."""
    from ingress.protocol.common import StructuredOutputs
    from tests.unit.fakes import byte_grammars
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    texts = ['{"a": 1}', '{ "a" :1 }', '{"a": 1, "b": 2}']
    grammars = []
    for body in ({"json": schema}, {"structural_tag": {"type": "structural_tag", "format": {
            "type": "tag", "begin": "<t>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</t>"}}}):
        model = StructuredOutputs.model_validate({**body, **so})
        model.check()
        grammars.append(byte_grammars().compile(model.spec()))
    assert [_accepts(grammars[0], t) for t in texts] == accepted[:3]
    assert _accepts(grammars[1], '<t>{\n"a":1}</t>') == accepted[3]


@pytest.mark.parametrize("tag", ["not json", "[1]", {"format": {"type": "tag"}},
                                 {"structures": [{"begin": "<a>", "end": "</a>"}], "triggers": ["<a"]},
                                 {"structures": [{"begin": "<a>", "schema": {}, "end": "</a>"}], "triggers": []},
                                 {"structures": [{"begin": "<a>", "schema": {"type": 5}, "end": "</a>"}],
                                  "triggers": ["<a"]}])
def test_a_malformed_structural_tag_is_a_400_before_compiling(tag):
    from deployments.errors import InvalidRequestError
    from ingress.protocol.common import StructuredOutputs
    with pytest.raises(InvalidRequestError) as err:
        StructuredOutputs.model_validate({"structural_tag": tag}).check()
    assert err.value.param == "structured_outputs.structural_tag"


@pytest.mark.parametrize("fmt,says", [({"type": "no_such_format"}, "no_such_format"),
                                      ({"type": "tag", "begin": "a", "content": {"type": "json_schema"}, "end": "b"},
                                       "json_schema field")])
def test_a_structural_tag_xgrammar_refuses_is_a_400_naming_structured_outputs(fmt, says):
    from deployments.errors import InvalidRequestError
    from tests.unit.fakes import byte_grammars
    with pytest.raises(InvalidRequestError) as err:
        byte_grammars().compile({"type": "structural_tag", "param": "structured_outputs", "format": fmt})
    assert err.value.param == "structured_outputs" and str(err.value).startswith("Invalid structural tag")
    assert says in str(err.value) and "Check failed" not in str(err.value)   # what is wrong, no C++ internals


@pytest.mark.parametrize("spec,what", [
    ({"type": "regex", "regex": "(((", "param": "structured_outputs"}, "Invalid regular expression"),
    ({"type": "regex", "regex": "[z-a]", "param": "structured_outputs"}, "Invalid regular expression"),
    ({"type": "grammar", "grammar": "root ::= undefined_rule", "param": "structured_outputs"}, "Invalid grammar"),
    ({"type": "grammar", "grammar": "start: (", "param": "structured_outputs"}, "Invalid grammar"),
])
def test_a_bad_regex_or_grammar_is_a_400_naming_structured_outputs(spec, what):
    from deployments.errors import InvalidRequestError
    from tests.unit.fakes import byte_grammars
    with pytest.raises(InvalidRequestError) as err:
        byte_grammars().compile(spec)
    assert err.value.param == "structured_outputs" and str(err.value).startswith(what)
    assert ".cc:" not in str(err.value)   # xgrammar's C++ source location is cut


def test_structured_outputs_make_a_random_model_answer_a_choice_and_a_regex(model):
    import re

    from tests.unit.fakes import byte_grammars
    g = byte_grammars()
    choices = ["positive", "negative", "neutral"]
    pick = req("c", "classify", temperature=1.0, seed=1, n=4, max_tokens=20)
    pick.grammar = g.compile({"type": "choice", "choice": choices})
    date = req("r", "a date", temperature=1.0, seed=2, n=2, max_tokens=20)
    date.grammar = g.compile({"type": "regex", "regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"})
    texts, reasons, _ = run_all(make_engine(model), [pick, date])
    assert all(t in choices for t in texts["c"].values()) and len(texts["c"]) == 4 and set(reasons["c"].values()) == {"stop"}
    assert all(re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", t) for t in texts["r"].values())
