"""Cold start of each default model: zero replicas to the first byte (chat, streamed) or the whole
response (embeddings, images, rerank), through Serve's proxy, split into phases from the replica's own
log (loading.py's "loaded in" line) and its process start time.

    .venv/bin/python bench/bench_coldstart.py [--tries 3] [--kinds chat,embedding,image,rerank]
        [--baseline REF]

Ray starts once; every model is deployed at min_replicas 0. Each try wakes one model at a time (the
others are at zero), then waits for it to scale back to zero. --baseline REF also deploys each model a
second time running the code of git REF (a `git archive` copy, put first on the replica's PYTHONPATH;
the ingress runs this tree's code), and the tries alternate baseline and this tree, so old and new
are measured in the same run on the same machine state.

Phases (medians): request -> the replica's process exists (Serve scales up from zero, Ray leases a
worker and forks it); process -> the model's load begins (Python, Ray worker and Serve replica start,
the deployment's module imported); the load (split as the replica logged it); load end -> first byte
(Serve marks the replica running, the router sends the queued request, the first forward).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from typing import Any, Optional

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import ROOT, default_args, median, print_table, start_app, stop_app  # noqa: E402
from deployments.builder import deployment_name  # noqa: E402

APP = "modelhub"
FAST = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "metrics_interval_s": 0.5,
        "look_back_period_s": 1.0, "upscale_delay_s": 0.0, "downscale_delay_s": 1.0,
        "downscale_to_zero_delay_s": 1.0}
LOADED = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*model (\S+) \((\w+)\): loaded in ([\d.]+) s"
                    r"(?: \(([^)]*)\))?")
REQUESTS = {
    "chat": ("chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                  "max_tokens": 4, "stream": True}),
    "embedding": ("embeddings", {"input": "hello"}),
    "image": ("images/generations", {"prompt": "a red square", "size": "64x64"}),
    "rerank": ("rerank", {"query": "capital of France", "documents": ["Paris is in France.", "Rome."]}),
}


def app_args(kinds: list[str], variants: dict[str, str]) -> dict[str, Any]:
    """The default app's models of `kinds`, each at min_replicas 0, once per variant (label -> code
    tree; the model id gets '@label' for every label but 'new')."""
    args = default_args()
    models = []
    for model in (m for m in args["models"] if m["kind"] in kinds):
        for label, tree in variants.items():
            m = {**model, "id": model["id"] if label == "new" else f"{model['id']}@{label}",
                 "cold_start_timeout_s": 600}
            actor = {**model.get("deployment", {}).get("ray_actor_options", {}),
                     "runtime_env": {"env_vars": {"PYTHONPATH": tree}}}
            m["deployment"] = {"ray_actor_options": actor, "autoscaling_config": dict(FAST),
                               "graceful_shutdown_timeout_s": 5}
            models.append(m)
    args["models"] = models
    return args


def baseline_tree(ref: str) -> str:
    """A copy of the repository at `ref` (its tracked files), in a temp dir."""
    out = tempfile.mkdtemp(prefix=f"coldstart-{ref.replace('/', '_')}-")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


def running_replicas(deployment: str) -> int:
    from ray import serve
    status = serve.status().applications[APP].deployments[deployment]
    return sum(n for state, n in status.replica_states.items() if state != "STOPPING")


def wait_at_zero(deployments: list[str], timeout_s: float = 300) -> None:
    """Until every listed deployment has no replica at all, and its processes are gone."""
    from ray import serve
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications[APP].deployments
        if all(not any(apps[d].replica_states.values()) for d in deployments) and not replica_pids(deployments):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{deployments} not at zero replicas after {timeout_s:.0f} s")


def replica_pids(deployments: list[str]) -> dict[int, float]:
    """pid -> process start time (epoch s) of the live replica processes of `deployments`."""
    import psutil
    titles = [f"ray::ServeReplica:{APP}:{d}" for d in deployments]
    out = {}
    for p in _raylet().children():   # this session's workers only: other Ray sessions may run the same app
        try:
            title = " ".join(p.cmdline()).strip()   # "ray::<actor class>", ".<method>" while it runs one
            if any(title == t or title.startswith((t + ".", t + " ")) for t in titles):
                out[p.pid] = p.create_time()
        except psutil.NoSuchProcess:
            pass
    return out


def _raylet():
    """This driver's raylet process (found by its session dir on its command line)."""
    import psutil
    import ray
    session = ray._private.worker._global_node.get_session_dir_path()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("/raylet") and session in " ".join(cmd):
            return p
    raise RuntimeError(f"no raylet for session {session}")


def send(url: str, kind: str, model: str) -> float:
    """Seconds from sending to the first streamed chunk (chat) or the whole response (the others)."""
    path, body = REQUESTS[kind]
    start = time.monotonic()
    with httpx.stream("POST", f"{url}/{path}", json={"model": model, **body}, timeout=600) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{model}: {reply.status_code} {reply.read()[:300]!r}")
        for line in reply.iter_lines():
            if kind == "chat" and line.startswith("data: {"):
                return time.monotonic() - start
    return time.monotonic() - start


def logged_load(logs: pathlib.Path, model: str, kind: str, since: float) -> Optional[dict[str, Any]]:
    """The replica's "loaded in" line for `model` logged after `since` (epoch s): its time (epoch s),
    total and phases."""
    for path in logs.glob("replica_*.log"):
        if path.stat().st_mtime < since:
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = LOADED.search(line)
            if not m or m.group(2) != model or m.group(3) != kind:
                continue
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at < since:
                continue
            phases = {}
            for part in filter(None, (m.group(5) or "").split(", ")):
                name, _, secs = part.rpartition(" ")[0].rpartition(" ")
                phases[name] = float(secs)
            return {"at": at, "total": float(m.group(4)), "phases": phases}
    return None


def one_cold_start(url: str, logs: pathlib.Path, kind: str, model: str, dep: str) -> dict[str, Any]:
    t0 = time.time()
    elapsed = send(url, kind, model)
    done = t0 + elapsed
    pids = replica_pids([dep])
    proc = max(pids.values()) if pids else float("nan")
    load = None
    for _ in range(20):   # the log file may lag a moment behind the response
        load = logged_load(logs, model, kind, t0)
        if load:
            break
        time.sleep(0.25)
    if load is None:
        raise RuntimeError(f"no 'loaded in' line for {model} in {logs}")
    load_start = load["at"] - load["total"]
    return {"total": elapsed, "to process": max(0.0, proc - t0), "process -> load": load_start - max(proc, t0),
            "load": load["total"], "load end -> response": done - load["at"], "phases": load["phases"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--kinds", default="chat,embedding,image,rerank")
    p.add_argument("--baseline", default=None, help="git ref whose code the baseline replicas run")
    opts = p.parse_args()
    kinds = opts.kinds.split(",")
    variants = {"new": str(ROOT)}
    if opts.baseline:
        variants = {opts.baseline: baseline_tree(opts.baseline), **variants}
    # Workers get the driver's cwd first on sys.path: run from a neutral dir so each variant's
    # PYTHONPATH decides which code its replicas import.
    os.chdir(tempfile.mkdtemp(prefix="coldstart-cwd-"))
    os.environ["RAY_worker_niceness"] = "0"   # replicas at the driver's priority, as in the test suite
    args = app_args(kinds, variants)
    url = start_app(args, env={"PYTHONPATH": str(ROOT)})
    import ray
    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    results: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    models = {m["id"]: m for m in args["models"]}
    deps = [deployment_name(m["id"], m["kind"]) for m in args["models"]]
    try:
        for t in range(opts.tries):
            for kind in kinds:
                order = list(variants) if t % 2 == 0 else list(reversed(variants))
                for label in order:
                    model = next(i for i, m in models.items() if m["kind"] == kind
                                 and (i.endswith(f"@{label}") if label != "new" else "@" not in i))
                    wait_at_zero(deps)
                    time.sleep(1.0)
                    try:
                        r = one_cold_start(url, logs, kind, model, deployment_name(model, kind))
                    except RuntimeError as exc:   # a model that fails is reported; the others still run
                        print(f"try {t + 1} {kind} {label}: FAILED {exc}", flush=True)
                        continue
                    results[(kind, label)].append(r)
                    print(f"try {t + 1} {kind} {label}: {r['total']:.2f} s  "
                          f"({', '.join(f'{k} {v:.2f}' for k, v in r.items() if k not in ('total', 'phases'))}; "
                          f"load: {r['phases']})", flush=True)
    finally:
        stop_app()
    report(results, variants)


def report(results: dict[tuple[str, str], list[dict[str, Any]]], variants: dict[str, str]) -> None:
    cols = ["total", "to process", "process -> load", "load", "load end -> response"]
    rows = [[kind, label, len(rs)] + [median([r[c] for r in rs]) for c in cols]
            for (kind, label), rs in sorted(results.items())]
    print("\nCold start, medians in seconds (chat: to the first streamed chunk; the others: the whole response)\n")
    print_table(["kind", "code", "tries"] + cols, rows)
    for (kind, label), rs in sorted(results.items()):
        names = list(dict.fromkeys(n for r in rs for n in r["phases"]))
        if names:
            print(f"\n{kind} ({label}): the load by phase, medians in seconds\n")
            print_table(names, [[median([r["phases"].get(n, 0.0) for r in rs]) for n in names]])


if __name__ == "__main__":
    main()
