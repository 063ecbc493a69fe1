"""Tensor-parallel replicas: one replica shards its model over `tensor_parallel_size` ranks.

Every rank holds a shard of the model and runs the same LLMEngine over it: SPMD at the engine level.
- **Sharding** is transformers' own `tp_plan="auto"`: attention heads and MLP columns are split,
  and the collectives run inside the forward. The heads must divide by the rank count.
- **Rank 0 is the Serve replica** and owns the requests. Before each step it sends the other
  ranks, over a gloo group, the requests added and aborted since the last step. After sampling it
  broadcasts its tokens over the model's group.
- **Lockstep.** Every rank's scheduler, batch, cache and stop checks therefore stay the same,
  whatever the floating-point details of each rank's logits.
- **A request that fails alone** (its token could not be processed) fails on every rank: rank 0
  sends its failures with the next step's aborts, and a follower aborts any it did not fail itself.
  A follower that failed a request rank 0 did not has diverged, and its loop stops (below).
- **Ranks 1.. are Ray actors** in the replica's placement group, one bundle each. The deployment
  asks for the bundles (builder.py), STRICT_PACK on one node. On GPUs each rank has its own GPU
  and NCCL carries the collectives; on CPU, gloo.

Why SPMD rather than rank 0 driving the other ranks' forwards: a step needs no Ray call, only the
collectives the model makes anyway plus one small broadcast each way. Each rank repeats rank 0's
bookkeeping, which costs a little CPU per step.

Failure: a rank whose loop fails ends it. Rank 0's next collective then fails, its engine thread
stops (a step error is fatal under TP), and the replica's health check fails too (it also watches
the ranks' loops). Serve then replaces the replica, and with it the ranks it owns.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STEP_TIMEOUT = timedelta(minutes=10)      # a collective inside a step
IDLE_TIMEOUT = timedelta(days=365)        # ranks wait on the control group while the replica is idle


def check_shardable(model_config: Any, world: int) -> None:
    """Raises ValueError, before any rank starts, when `world` does not divide the model's attention
    or key/value heads (tp_plan "auto" splits both across the ranks)."""
    heads = getattr(model_config, "num_attention_heads", None)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    bad = [f"{n} {what}" for what, n in (("attention heads", heads), ("key/value heads", kv_heads)) if n and n % world]
    if bad:
        raise ValueError(f"tensor_parallel_size {world} must divide the model's heads, and it has "
                         f"{' and '.join(bad)}. Choose a divisor of both.")


class Lockstep:
    """The engine's hooks under TP (engine.py calls them). The leader (rank 0) records adds and
    aborts and sends them before each step; every rank takes rank 0's sampled tokens."""

    def __init__(self, control: Any, leader: bool):
        self.control, self.leader = control, leader
        self._pending: list[tuple[str, Any]] = []
        self._failed_here: set[str] = set()   # a follower's own failures since the last step

    def added(self, req: Any) -> None:
        if self.leader:
            self._pending.append(("add", (req.request_id, req.prompts, req.params, req.max_tokens,
                                          req.grammar_spec)))

    def aborted(self, request_id: str) -> None:
        if self.leader:
            self._pending.append(("abort", request_id))

    def failed(self, request_id: str) -> None:
        """The engine failed this request alone. Rank 0's verdict goes to the other ranks as an abort;
        a follower's own is checked against it (receive)."""
        if self.leader:
            self.aborted(request_id)
        else:
            self._failed_here.add(request_id)

    def before_step(self) -> None:
        if self.leader:
            msg, self._pending = [self._pending], []
            dist.broadcast_object_list(msg, src=0, group=self.control)

    def receive(self) -> Optional[list[tuple[str, Any]]]:
        """A follower's next step's operations (None: stop)."""
        msg: list[Any] = [None]
        dist.broadcast_object_list(msg, src=0, group=self.control)
        if msg[0] is not None:
            self.check_failures(msg[0])
        return msg[0]

    def check_failures(self, ops: list[tuple[str, Any]]) -> None:
        """Raises when this follower failed a request that rank 0 went on with: their batches differ,
        and no later step could match."""
        diverged = self._failed_here - {arg for op, arg in ops if op == "abort"}
        self._failed_here = set()
        if diverged:
            raise RuntimeError(f"this rank failed {len(diverged)} request(s) that rank 0 did not; the ranks diverged")

    def stop(self) -> None:
        if self.leader:
            dist.broadcast_object_list([None], src=0, group=self.control)

    def tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.contiguous()
        dist.broadcast(tokens, src=0)
        return tokens


def init_rank(rank: int, world: int, address: str, port: int, device: torch.device) -> Any:
    """Joins the process group; returns the gloo control group. Each rank sees one device (Ray
    gives each bundle its own GPU), so every rank is LOCAL_RANK 0 for transformers."""
    os.environ["LOCAL_RANK"] = "0"
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=STEP_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def follow(engine: Any, lockstep: Lockstep, make_request) -> None:
    """A follower rank's loop: apply rank 0's adds and aborts, then take the same step."""
    while True:
        ops = lockstep.receive()
        if ops is None:
            return
        for op, arg in ops:
            if op == "add":
                engine.add(make_request(*arg))
            else:
                engine.abort(arg)
        engine.step()


class TPRank:
    """A follower rank: a Ray actor in one bundle of the replica's placement group."""

    def setup(self, cfg: Any, source: str, rank: int, world: int, address: str, port: int) -> None:
        from deployments.llm.factory import build_engine
        self.engine = build_engine(cfg, source, tp=(rank, world, address, port)).engine
        self._grammars = None

    def follow(self) -> None:
        try:
            follow(self.engine, self.engine.lockstep, self._request)
        except Exception:
            logger.exception("tensor-parallel rank stopped")
            raise

    def _request(self, request_id, prompts, params, max_tokens, grammar_spec):
        from deployments.llm.request import EngineRequest
        req = EngineRequest(request_id, prompts, params, max_tokens, grammar_spec=grammar_spec)
        if grammar_spec is not None:
            if self._grammars is None:
                from deployments.llm.structured import Grammars
                self._grammars = Grammars.for_engine(self.engine)
            req.grammar = self._grammars.compile(grammar_spec)
        return req


class RankGroup:
    """Rank 0's view of the other ranks: starts them, and says whether their loops still run."""

    def __init__(self, cfg: Any, source: str, world: int):
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        pg = get_current_placement_group()
        if pg is None:
            raise RuntimeError("tensor_parallel_size > 1 needs the replica's placement group "
                               "(deployments/builder.py asks Serve for one bundle per rank)")
        self.address, self.port = ray.util.get_node_ip_address(), _free_port()
        bundle = pg.bundle_specs[0]
        actor = ray.remote(TPRank)
        self.ranks = [actor.options(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r))
                      .remote() for r in range(1, world)]
        self._setup = [a.setup.remote(cfg, source, r, world, self.address, self.port)
                       for r, a in enumerate(self.ranks, start=1)]
        self._loops: list[Any] = []

    def join(self, build: Callable[[], Any]) -> Any:
        """Runs rank 0's `build` (join the group, load the shard) while the other ranks set up, then
        starts their loops. A rank that fails to set up fails the replica's start at once, rather
        than after the group's rendezvous timeout."""
        import ray
        result = run_watching(build, self._setup, ray.wait, ray.get)
        ray.get(self._setup)
        self._loops = [a.follow.remote() for a in self.ranks]
        return result

    def check(self) -> None:
        import ray
        done, _ = ray.wait(self._loops, num_returns=1, timeout=0) if self._loops else ([], None)
        if done:
            raise RuntimeError("a tensor-parallel rank stopped")


def run_watching(build: Callable[[], Any], others: list, wait: Callable, get: Callable, poll_s: float = 1.0) -> Any:
    """build() on a helper thread; meanwhile each of `others` (Ray refs) that finishes is fetched,
    so its error is raised here. A build stuck in a collective is abandoned with its thread (the
    replica is failing anyway)."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tp-rank0")
    future = pool.submit(build)
    pending = list(others)
    try:
        while True:
            try:
                return future.result(timeout=poll_s)
            except concurrent.futures.TimeoutError:
                pass
            if pending:
                done, pending = wait(pending, num_returns=len(pending), timeout=0)
                for ref in done:
                    get(ref)
    finally:
        pool.shutdown(wait=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
