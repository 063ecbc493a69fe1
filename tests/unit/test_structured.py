"""Grammar-constrained decoding (structured.py) through the engine."""
from __future__ import annotations

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
