"""The engine factories (factory.py) on a tiny random Llama saved to disk."""
from __future__ import annotations

from tests.unit.fakes import tiny_llama


def test_build_engine_returns_the_engine_and_its_tokenizer_by_name(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from deployments.config import ChatModelConfig
    from deployments.llm.engine import LLMEngine
    from deployments.llm.factory import LoadedEngine, build_engine
    tiny_llama().save_pretrained(tmp_path)
    vocab = {chr(65 + i): i for i in range(26)} | {"[UNK]": 26}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                            unk_token="[UNK]").save_pretrained(tmp_path)
    cfg = ChatModelConfig(id="tiny", kind="chat", source=str(tmp_path), engine={"max_model_len": 48})
    loaded = build_engine(cfg, cfg.source)
    assert isinstance(loaded, LoadedEngine) and isinstance(loaded.engine, LLMEngine)
    assert loaded.tokenizer.convert_tokens_to_ids("C") == 2
    assert loaded.engine.tokenizer is loaded.tokenizer and loaded.engine.max_model_len == 48


def test_the_kv_cache_defaults_to_slots_where_mixed_steps_run_and_follows_the_config_otherwise(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from deployments.config import ChatModelConfig
    from deployments.llm.factory import build_engine
    from deployments.llm.kv_cache import KVCache, SlotKVCache
    tiny_llama().save_pretrained(tmp_path)
    vocab = {chr(65 + i): i for i in range(26)} | {"[UNK]": 26}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                            unk_token="[UNK]").save_pretrained(tmp_path)

    def cache(**engine):
        cfg = ChatModelConfig(id="tiny", kind="chat", source=str(tmp_path), engine={"max_model_len": 48, **engine})
        return build_engine(cfg, cfg.source).engine.batch.kv

    assert isinstance(cache(), SlotKVCache)                     # CPU: mixed steps, so slots
    assert isinstance(cache(kv_cache="padded"), KVCache)
    assert isinstance(cache(mixed_steps=False), KVCache)                    # separate prefill steps: padded
    assert isinstance(cache(kv_cache="slots"), SlotKVCache)
