"""Tensor parallelism without Ray: two CPU processes over gloo, each with half of a tiny Llama
(transformers' tp_plan "auto"), run the engine in lockstep (deployments/llm/tp.py)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.unit.fakes import tiny_llama

WORLD = 2


def _requests():
    from deployments.llm.request import EngineRequest
    from deployments.types import SamplingParams

    def r(rid, text, **kw):
        p = SamplingParams(**{"max_tokens": 10, "temperature": 0.0, **kw})
        return EngineRequest(rid, [list(text.encode())], p, [p.max_tokens])
    return [r("greedy", "hello there"), r("seeded", "abc", temperature=1.0, seed=7, n=2),
            r("unseeded", "tp", temperature=1.0, top_p=0.9), r("stop", "stop me", stop=["e"], max_tokens=20),
            r("aborted", "abort me", max_tokens=30), r("late", "joins late", max_tokens=8),
            r("fails everywhere", "boom", max_tokens=12), r("fails on rank 0", "bang", max_tokens=12),
            r("no token left", "banned", allowed_token_ids=[65], bad_word_ids=[[65]])]   # a 400 for it alone


def _failing_take(engine, rank: int) -> None:
    """Processing a request's third token raises: for one request on every rank, for another on
    rank 0 only (a failure that is not a function of the request, such as running out of memory)."""
    take = engine.outputs.take

    def failing(seq, token):
        take(seq, token)
        if len(seq.output_ids) == 3 and (seq.request_id == "fails everywhere"
                                         or (seq.request_id == "fails on rank 0" and rank == 0)):
            raise RuntimeError("processing this token failed")
    engine.outputs.take = failing


def _engine(model, lockstep=None):
    from deployments.llm.engine import LLMEngine
    from tests.unit.fakes import ByteTokenizer
    return LLMEngine(model, ByteTokenizer(), max_model_len=256, max_num_seqs=8, max_num_batched_tokens=4096,
                     max_prefill_tokens=12, lockstep=lockstep)


def _drive(engine, rank: int = 0):
    """Adds requests over several steps, aborts one mid-way; returns {request_id: [output ids per choice]}."""
    _failing_take(engine, rank)
    reqs = _requests()
    pending = list(reqs[:-1])
    steps = 0
    while engine.has_work() or pending:
        if pending:
            engine.add(pending.pop(0))
        if steps == 4:
            engine.abort("aborted")
        if steps == 6:
            engine.add(reqs[-1])
        engine.step()
        steps += 1
    return {r.request_id: [s.output_ids for s in r.seqs] for r in reqs}


def _rank(rank: int, port: int, path: str, results) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from deployments.llm.request import EngineRequest
    from deployments.llm.tp import Lockstep, follow, init_rank
    torch.set_num_threads(1)
    control = init_rank(rank, WORLD, "127.0.0.1", port, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=DistributedConfig(tp_size=WORLD, tp_plan="auto")).eval()
    lockstep = Lockstep(control, leader=rank == 0)
    engine = _engine(model, lockstep)
    if rank == 0:
        out = _drive(engine)
        lockstep.stop()
    else:
        seen = {}

        def make_request(rid, prompts, params, max_tokens, grammar_spec):
            seen[rid] = EngineRequest(rid, prompts, params, max_tokens, grammar_spec=grammar_spec)
            return seen[rid]
        _failing_take(engine, rank)
        follow(engine, lockstep, make_request)
        out = {rid: [s.output_ids for s in r.seqs] for rid, r in seen.items()}
    heads = model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0]
    results.put((rank, out, heads))


def test_two_ranks_stay_in_lockstep_and_match_the_whole_model(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    reference = _drive(_engine(model))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path), results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        got = dict((rank, (out, rows)) for rank, out, rows in (results.get(timeout=120) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    leader, follower = got[0][0], got[1][0]
    assert got[0][1] == got[1][1] == model.config.hidden_size // WORLD     # each rank holds half the heads
    assert follower == leader                           # same tokens, same stops, same abort, every choice
    for rid in ("greedy", "stop", "late"):              # greedy: the sharded model answers as the whole one
        assert leader[rid] == reference[rid]
    assert leader["seeded"] == reference["seeded"]      # a seed reproduces across sharding too
    assert len(leader["aborted"][0]) < 30
    assert leader["no token left"] == reference["no token left"] == [[]]   # failed alone; every rank went on
    for rid in ("fails everywhere", "fails on rank 0"):   # failed alone on the third token; the rest went on
        assert [len(ids) for ids in leader[rid]] == [3]


def test_rank_zero_fails_fast_when_another_rank_fails_to_set_up():
    import threading

    import pytest

    from deployments.llm.tp import run_watching
    stuck = threading.Event()                       # rank 0 waits in the rendezvous for a rank that died

    def get(ref):
        if ref == "bad":
            raise RuntimeError("rank 2: CUDA out of memory")
    with pytest.raises(RuntimeError, match="rank 2"):
        run_watching(stuck.wait, ["ok", "bad"], lambda refs, num_returns, timeout: (refs, []), get, poll_s=0.01)
    stuck.set()
    assert run_watching(lambda: "engine", ["ok"], lambda refs, num_returns, timeout: (refs, []), get, poll_s=0.01) == "engine"


def test_a_rank_count_that_does_not_divide_the_heads_is_refused_before_any_rank_starts():
    import pytest

    from deployments.llm.tp import check_shardable
    cfg = tiny_llama().config                              # 4 attention heads, 2 key/value heads
    check_shardable(cfg, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 .* 4 attention heads and 2 key/value heads"):
        check_shardable(cfg, 3)
    with pytest.raises(ValueError, match="has 2 key/value heads\\."):
        check_shardable(cfg, 4)


def test_a_replica_with_such_a_rank_count_fails_to_start_with_that_message(tmp_path):
    import pytest

    from deployments.config import ChatModelConfig
    from deployments.llm.factory import build_async_engine
    tiny_llama().save_pretrained(tmp_path)
    cfg = ChatModelConfig(id="tiny", kind="chat", source=str(tmp_path), engine={"tensor_parallel_size": 3})
    with pytest.raises(ValueError, match="must divide the model's heads"):
        build_async_engine(cfg)


def test_a_follower_that_failed_a_request_rank_zero_went_on_with_stops():
    """Its batch no longer matches rank 0's, so no later step could: its loop must end (which fails
    rank 0's next collective and the replica's health check) rather than run on out of step."""
    from deployments.llm.tp import Lockstep
    follower = Lockstep(control=None, leader=False)
    follower.failed("a")
    follower.check_failures([("add", ("b", [], None, [], None)), ("abort", "a")])   # rank 0 failed it too
    follower.failed("c")
    with pytest.raises(RuntimeError, match="diverged"):
        follower.check_failures([("abort", "a")])
    follower.check_failures([])   # checked once: the next step starts clean
