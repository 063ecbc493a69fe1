"""Incremental detokenization, stop strings and token text (detokenizer.py)."""
from __future__ import annotations

from deployments.llm.detokenizer import IncrementalDetokenizer, StopMatcher
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


def test_stop_matcher_can_keep_the_stop_string_in_the_output():
    """vLLM's include_stop_str_in_output: the text ends after the first stop string (the longest of those
    starting there)."""
    m = StopMatcher(["STOP", "never"], include=True)
    out = []
    for piece in ["Hello S", "TO", "P and more"]:
        m.append(piece)
        out.append(m.take_ready(final=False))
    assert out[:2] == ["Hello ", ""] and m.stopped and m.text == "Hello STOP"
    assert "".join(out) + m.take_ready(final=True) == "Hello STOP"
    both = StopMatcher(["ST", "STOP"], include=True)
    assert both.append("Hello STOP and more") and both.text == "Hello STOP"


def test_special_tokens_are_left_out_of_the_text_unless_asked_for():
    class WithSpecial(ByteTokenizer):
        def decode(self, ids, skip_special_tokens: bool = False) -> str:
            return "".join("" if i == 256 and skip_special_tokens else "<eos>" if i == 256 else chr(i) for i in ids)
    for skip, text in ((True, "ab"), (False, "a<eos>b")):
        detok = IncrementalDetokenizer(WithSpecial(), list(b"p"), skip_special_tokens=skip)
        assert "".join(detok.push(t) for t in (97, 256, 98)) == text


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
