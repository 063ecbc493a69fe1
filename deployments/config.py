"""Validated configuration for the whole application: the `args` of serve_config.yaml.

Every field has a description; unknown or misspelled keys are errors that name the key and
suggest the closest valid one. Must not import torch, FastAPI or Ray.
"""
from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.autoscaling import QueueDepthPolicy
from deployments.types import ModelCard


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class AutoscalingOptions(StrictModel):
    """Serve's autoscaling for one model's deployment. Fields left unset take the model kind's
    defaults (`autoscaling_defaults` of each model config), so `autoscaling_config: {}` is enough."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 lets an idle model scale to zero "
                                                   "(its first request then waits for a cold start).")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    initial_replicas: Optional[int] = Field(
        None, ge=0, description="Replicas at deploy time (default: min_replicas).")
    policy: Literal["requests", "queue_depth"] = Field(
        "requests", description="What the replica count follows. 'requests': Serve's own policy, requests in "
                                "flight per replica against target_ongoing_requests. 'queue_depth' (chat models "
                                "only): sequences in the engines, running plus waiting for a batch slot (a "
                                "request with n=8, or a completions prompt list, counts each sequence), against "
                                "target_sequences_per_replica. Both keep the delays and bounds below "
                                "(docs/operations.md says when to pick which).")
    target_ongoing_requests: Optional[float] = Field(
        None, gt=0, description="Policy 'requests': requests in flight per replica that Serve aims for (running "
                                "plus queued at the replica); more per replica scales up, fewer scales down. "
                                "Default: the model kind's (2 for the ingress).")
    target_sequences_per_replica: Optional[float] = Field(
        None, gt=0, description="Policy 'queue_depth': engine sequences per replica to aim for; replicas = "
                                "ceil(sequences in all engines / this). Default: max_num_seqs / 2.")
    upscale_delay_s: float = Field(30.0, ge=0, description="How long the load must call for more replicas "
                                                           "before Serve adds them.")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long the load must call for fewer "
                                                              "replicas before Serve removes one.")
    downscale_to_zero_delay_s: Optional[float] = Field(
        None, ge=0, description="With min_replicas 0: how long an idle model keeps its last replica "
                                "(default: downscale_delay_s).")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas and handles report load.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the reported load is averaged over.")
    upscaling_factor: Optional[float] = Field(
        None, gt=0, description="Scales each upscaling step (below 1: more cautious).")
    downscaling_factor: Optional[float] = Field(
        None, gt=0, description="Scales each downscaling step (below 1: more cautious).")

    @model_validator(mode="after")
    def _bounds(self):
        if self.policy == "queue_depth" and self.target_ongoing_requests is not None:
            raise ValueError("autoscaling_config.target_ongoing_requests is the 'requests' policy's target; with "
                             "policy 'queue_depth' set target_sequences_per_replica")
        if self.policy == "requests" and self.target_sequences_per_replica is not None:
            raise ValueError("autoscaling_config.target_sequences_per_replica needs policy 'queue_depth' "
                             "(policy 'requests' aims at target_ongoing_requests)")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                             f"({self.min_replicas}) and max_replicas ({self.max_replicas})")
        return self

    def with_defaults(self, defaults: dict[str, Any]) -> "AutoscalingOptions":
        """This config with every field the user did not write taken from `defaults`."""
        unset = {k: v for k, v in defaults.items() if k not in self.model_fields_set}
        return AutoscalingOptions.model_validate({**self.model_dump(include=self.model_fields_set), **unset})

    def serve_config(self) -> dict[str, Any]:
        """Serve's autoscaling_config: these fields, with 'queue_depth' as Serve's custom policy hook."""
        out = self.model_dump(exclude_none=True, exclude={"policy", "target_sequences_per_replica"})
        if self.policy == "queue_depth":
            if self.target_sequences_per_replica is None:
                raise ValueError("policy 'queue_depth' needs target_sequences_per_replica")
            out["policy"] = {"policy_function": f"{QueueDepthPolicy.__module__}:{QueueDepthPolicy.__qualname__}",
                             "policy_kwargs": {"target_sequences_per_replica": self.target_sequences_per_replica}}
        return out


class DeploymentOptions(StrictModel):
    """Ray Serve options for one deployment. Unset fields get per-kind defaults."""

    num_replicas: Optional[Union[Annotated[int, Field(ge=1)], Literal["auto"]]] = Field(
        None, description="Fixed replica count; 'auto' is autoscaling_config with the kind's defaults.")
    autoscaling_config: Optional[AutoscalingOptions] = Field(
        None, description="Scale with the load between min_replicas and max_replicas (0 allowed: scale "
                          "to zero). Unset fields get the model kind's defaults. Excludes num_replicas.")
    max_ongoing_requests: Optional[int] = Field(
        None, ge=1, description="Requests one replica works on at once; Serve's default of 5 "
                                "throttles batching engines, so every kind sets its own.")
    max_queued_requests: Optional[int] = Field(
        None, ge=-1, description="Requests a caller may queue for this deployment before Serve "
                                 "rejects with 503; -1 means unbounded.")
    ray_actor_options: dict[str, Any] = Field(
        default_factory=dict, description="Ray actor options per replica (num_cpus, num_gpus, "
                                          "memory, runtime_env, resources).")
    health_check_period_s: Optional[float] = Field(None, gt=0, description="Seconds between health checks.")
    graceful_shutdown_timeout_s: Optional[float] = Field(
        None, ge=0, description="Seconds a stopping replica waits for in-flight requests.")

    @model_validator(mode="after")
    def _one_scaling_mode(self):
        if self.autoscaling_config is not None and self.num_replicas is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        if self.num_replicas == "auto":
            self.num_replicas, self.autoscaling_config = None, AutoscalingOptions()
        return self

    def serve_options(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for serve.deployment(), explicit fields over per-kind defaults."""
        opts = dict(defaults)
        actor = {**defaults.get("ray_actor_options", {}), **self.ray_actor_options}
        opts.update(self.model_dump(exclude_none=True, exclude={"ray_actor_options", "autoscaling_config"}))
        opts["ray_actor_options"] = actor
        if self.autoscaling_config is not None:
            opts.pop("num_replicas", None)
            opts["autoscaling_config"] = self.autoscaling_config.serve_config()
        return opts


class LLMEngineConfig(StrictModel):
    """Options of the continuous-batching LLM engine."""

    device: Device = Field("auto", description="'auto' picks cuda when available, else cpu.")
    dtype: DType = Field("auto", description="'auto' is bfloat16 on CUDA and on CPUs with native bf16 "
                                             "(AVX512_BF16/AMX), float32 on other CPUs.")
    max_num_seqs: int = Field(32, ge=1, description="Sequences decoded together in one step.")
    max_num_batched_tokens: int = Field(
        65536, ge=16, description="KV budget: tokens (prompt + output, padding included) the running "
                                  "batch may hold. New sequences wait while it is full.")
    max_prefill_tokens: Optional[int] = Field(
        None, ge=1, description="Most prompt tokens admitted per step (default: 64 on CPU, 2048 on CUDA, "
                              "where a forward's cost hardly grows with its tokens; at least one prompt always goes, "
                              "however long): with mixed steps, prefilled in the same forward as the "
                              "running rows' decode; without, in prefill steps between two decode steps. "
                              "A burst is admitted over several steps, so running streams keep moving, and "
                              "closed-loop clients admitted a few at a time do not come back as cohorts "
                              "that queue for their first token. Larger values batch more prompts per "
                              "forward (TTFT against throughput: bench/README.md).")
    mixed_steps: Optional[bool] = Field(
        None, description="Prefill new prompts in the same forward pass as the running rows' decode "
                          "(Llama-family attention without sliding window; other models always use "
                          "separate prefill steps). Off: separate prefill steps. Default: on for CPU, "
                          "off on CUDA, where a step is launch-bound and separate prefill steps "
                          "measured faster at 128 streams (docs/gpu.md).")
    late_admission: bool = Field(
        True, description="With mixed steps (Llama-family models, not under tensor parallelism): a prompt "
                          "that arrives while a step's forward runs may join it before a quarter or half "
                          "of the layers, run alone through the layers already done, and get its first "
                          "token at the end of that step instead of the next. Costs the running rows the "
                          "replayed layers. bench/README.md has the trade-off.")
    max_waiting: int = Field(
        256, ge=0, description="Requests waiting for a batch slot; beyond it the answer is 503 "
                               "with Retry-After.")
    max_model_len: Optional[int] = Field(
        None, ge=16, description="Context window; defaults to the model's max_position_embeddings.")
    max_n: int = Field(16, ge=1, le=128, description="Largest `n` a request may ask for.")
    default_temperature: float = Field(
        1.0, ge=0, le=2, description="temperature for requests that omit it (OpenAI's default is 1.0; set "
                                     "a model card's recommendation, as vLLM does from generation_config).")
    default_top_p: float = Field(1.0, gt=0, le=1, description="top_p for requests that omit it.")
    default_max_tokens: Optional[int] = Field(
        None, ge=1, description="Generation length for requests that set neither max_tokens nor "
                                "max_completion_tokens (clamped to the room left in the context window). "
                                "Unset: OpenAI's defaults, i.e. chat generates until a stop or the context "
                                "window is full, and completions generate 16 tokens. The IONOS API documents "
                                "16 for both: set 16 to match it.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks one replica shards the model over (transformers' tp_plan 'auto'; the "
                             "attention heads must divide by it). Each rank gets a bundle like the "
                             "replica's ray_actor_options (e.g. num_gpus: 1), placed per tensor_parallel_placement.")
    tensor_parallel_placement: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Ray placement-group strategy of the ranks' bundles: STRICT_PACK keeps them on "
                                   "one node (collectives over NVLink/shared memory; the default), SPREAD puts them "
                                   "on as many nodes as it can, STRICT_SPREAD one per node (collectives then "
                                   "cross the network every layer).")
    stream_interval_ms: float = Field(
        0.0, ge=0, description="Coalesce a stream's tokens into one chunk at most this often; 0 "
                               "sends whatever is ready each time the client side is free.")
    max_chunks_per_s: float = Field(
        100.0, ge=0, description="Ceiling on streamed chunks per second over all of a replica's streams. "
                                 "Each chunk costs the replica CPU that the model step then lacks, so "
                                 "under load a stream's tokens are coalesced: a stream sends at most every "
                                 "(streams / max_chunks_per_s) s. At low load every token goes at once; "
                                 "a stream's first token always does. 0 = no ceiling.")
    num_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (CPU only).")
    step_timeout_s: float = Field(
        300.0, gt=0, description="A step that runs longer than this means the engine is wedged: the replica "
                                 "fails its health check and Serve replaces it.")
    grammar_compile_timeout_s: float = Field(
        10.0, gt=0, description="A `response_format` schema or `structured_outputs` constraint whose grammar "
                                "takes longer to compile is a 400 (at most two compiles run at once per "
                                "replica; one that waited for them this long is a 503).")
    prepack_weights: bool = Field(
        True, description="CPU only: the linear layers run on weights packed once at load for oneDNN "
                          "(bit-identical outputs in bf16; faster at every batch size: bench/README.md). False: torch's F.linear on the plain weights. Not "
                          "applied to tensor-parallel shards.")
    batch_invariant: Optional[bool] = Field(
        None, description="A request's output (greedy, or seeded) does not depend on what else is running: each "
                          "row of a step is computed as it would be alone (decode attention per sequence over "
                          "its own keys, never padding; a prompt's attention over its own tokens; a lone row "
                          "through a linear layer as one of two where oneDNN's one-row kernel rounds "
                          "differently). Costs throughput under load (bench/README.md). Needs mixed steps and "
                          "prepacked weights. Default: on for CPU; not supported on CUDA (its GEMM kernels "
                          "depend on the batch size).")
    kv_cache: Optional[Literal["padded", "slots"]] = Field(
        None, description="How the running rows' KV cache is laid out. padded: one left-padded cache, "
                          "rows merged in by padding and concatenation and dropped by selection. slots: "
                          "each row in a slot of fixed buffers (grown by doubling when outgrown), the "
                          "decode step writing one column per row in place, with no padding or merging; "
                          "needs mixed steps. Same outputs either way (bench/README.md compares their "
                          "speed); slots is the layout a CUDA-graph decode path needs (not built yet). "
                          "Default: slots where mixed steps run, else padded.")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint.")
    revision: Optional[str] = Field(None, description="HF revision (branch, tag or commit).")
    chat_template: Optional[str] = Field(None, description="Jinja chat template overriding the model's.")
    tool_parser: Optional[Literal["hermes", "llama3_json", "mistral"]] = Field(
        None, description="How the model writes tool calls: 'hermes' (Hermes/Qwen `<tool_call>{json}</tool_call>`), "
                          "'llama3_json' (Llama 3 `{\"name\": ..., \"parameters\": ...}`) or 'mistral' "
                          "(`[TOOL_CALLS][...]`). Forced calls are decoded in this format and replies parsed "
                          "with it. Default: from the chat template's own tool syntax, else 'hermes'.")
    max_tools: int = Field(128, ge=1, description="Most `tools` one request may offer; more is a 400.")
    cache_dir: Optional[str] = Field(
        None, description="Where a dequantized copy of a GGUF checkpoint is cached; default "
                          "$MODELHUB_CACHE or ~/.cache/modelhub.")

    @model_validator(mode="after")
    def _invariance_needs(self):
        if self.batch_invariant:
            for clash, why in ((self.device == "cuda", "device 'cuda'"), (self.mixed_steps is False, "mixed_steps false"),
                               (not self.prepack_weights, "prepack_weights false"),
                               (self.tensor_parallel_size > 1, "tensor_parallel_size > 1")):
                if clash:
                    raise ValueError(f"batch_invariant true does not work with {why}")
        return self


class EmbeddingEngineConfig(StrictModel):
    """Options of the sentence-transformers embedding deployment."""

    device: Device = Field("auto", description="'auto' picks cuda when available, else cpu.")
    dtype: DType = Field("auto", description="'auto' keeps the checkpoint's float32 on CPU, float16 on CUDA.")
    max_batch_size: int = Field(64, ge=1, description="Requests @serve.batch gathers into one call.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill up.")
    max_batch_tokens: int = Field(
        2048, ge=1, description="Token budget of one forward pass (padding included); a batch is "
                                "cut into length-sorted sub-batches under it. On CPU ~2k tokens "
                                "(~100 short sentences) ran fastest; 16k was ~25% slower.")
    max_inputs: int = Field(2048, ge=1, le=2048, description="Inputs one request may send.")
    truncate: bool = Field(False, description="Truncate inputs over the model's maximum length "
                                              "instead of rejecting them with 400.")
    matryoshka_dimensions: Optional[list[int]] = Field(
        None, description="Set for Matryoshka-trained models: the `dimensions` a client may ask for "
                          "(vectors are truncated then re-normalised). Unset: `dimensions` is a 400.")
    query_prefix: Optional[str] = Field(None, description="Text prepended to every input (e.g. 'query: ' for e5).")
    num_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (CPU only).")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint.")


class RerankEngineConfig(StrictModel):
    """Options of the sentence-transformers CrossEncoder deployment (/v1/rerank and /v1/score)."""

    device: Device = Field("auto", description="'auto' picks cuda when available, else cpu.")
    dtype: DType = Field("auto", description="'auto' keeps the checkpoint's float32 on CPU, float16 on CUDA.")
    max_batch_size: int = Field(64, ge=1, description="Requests @serve.batch gathers into one call.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill up.")
    max_batch_tokens: int = Field(
        2048, ge=1, description="Token budget of one forward pass (padding included); a batch's "
                                "(query, document) pairs are cut into length-sorted sub-batches under it.")
    max_documents: int = Field(1024, ge=1, description="Documents (pairs) one request may score.")
    truncate: bool = Field(False, description="Truncate pairs over the model's maximum length instead of "
                                              "rejecting them with 400.")
    num_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (CPU only).")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint.")


class ImageEngineConfig(StrictModel):
    """Options of the diffusers text-to-image deployment."""

    device: Device = Field("auto", description="'auto' picks cuda when available, else cpu.")
    dtype: DType = Field("auto", description="'auto' is float32 on CPU and float16 on CUDA.")
    sizes: list[str] = Field(["1024*1024"], min_length=1, description="Allowed sizes, written W*H as in the IONOS "
                                                                      "API (WxH is accepted and shown as W*H); the "
                                                                      "first is the default.")
    default_steps: int = Field(30, ge=1, le=500, description="num_inference_steps when the request sets none.")
    max_steps: int = Field(100, ge=1, le=500, description="Largest num_inference_steps a request may ask for.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance when the request sets none.")
    max_n: int = Field(10, ge=1, le=10, description="Largest `n` per request.")
    seed: Optional[int] = Field(None, description="Seed used when a request sets none (None: random).")
    max_batch_size: int = Field(
        4, ge=1, description="Requests @serve.batch gathers at most; those with the same size, steps, "
                             "guidance scale and use of negative_prompt share one pipeline call (up to "
                             "max_batch_size * max_n images: mind GPU memory). 1: no batching.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long the first request of a batch waits for others to join it. 0: an idle "
                               "replica starts at once, and requests arriving during a call form the next batch.")

    @field_validator("sizes")
    @classmethod
    def _sizes_parse(cls, v: list[str]) -> list[str]:
        out = []
        for s in v:
            parsed = parse_size(s)
            if parsed is None:
                raise ValueError(f"size {s!r} is not WIDTH*HEIGHT")
            out.append(format_size(*parsed))
        return out


def format_size(width: int, height: int) -> str:
    """The one way sizes are shown (model cards, errors, responses): W*H, as the IONOS API writes them."""
    return f"{width}*{height}"


_SIZE = re.compile(r"([0-9]{1,5})[x*]([0-9]{1,5})")   # ASCII digits only: str.isdigit also takes '²' and '١'


def parse_size(size: str) -> Optional[tuple[int, int]]:
    """'512x512' or '512*512' -> (512, 512); anything else -> None."""
    m = _SIZE.fullmatch(size)
    if m is None:
        return None
    w, h = int(m[1]), int(m[2])
    return (w, h) if 0 < w <= 8192 and 0 < h <= 8192 else None


class _ModelBase(StrictModel):
    id: str = Field(min_length=1, description="The name clients send as `model`.")
    source: Optional[str] = Field(None, min_length=1, description=(
        "Where the weights come from: an HF repo id ('org/name'), a local directory, a .gguf file, "
        "'package:<pkg>/<file-or-dir>' for a file shipped in an installed Python package, or "
        "'builtin:<name>' for a model built in code. Required, except on a hub entry that names an "
        "`application`."))
    application: Optional[str] = Field(
        None, min_length=1, description=(
            "On a model of the hub (`ingress.app:build_app`): the Serve application that deploys this model "
            "(`import_path: ingress.app:build_model_app`, `route_prefix: null`, its args `model:` holding this "
            "model's id, kind, source, engine and deployment). The hub does not deploy it but routes to it by "
            "handle, so that application "
            "can be redeployed alone while the hub and its other models keep running (docs/operations.md). "
            "Such an entry holds only what the ingress reads: id, kind, application, owned_by and "
            "cold_start_timeout_s, which bounds the wait whenever the model has no running replica. Not for "
            "image models (the ingress checks image requests against the model's own engine config)."))
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions,
                                          description="Ray Serve options of this model's deployment.")
    owned_by: str = Field("modelhub", description="`owned_by` in /v1/models.")
    cold_start_timeout_s: float = Field(
        120.0, gt=0, description="With autoscaling_config.min_replicas 0, or on an entry naming an `application`: "
                                 "how long a request to the model at zero replicas waits for one to start; then it "
                                 "gets 503 with Retry-After (its cold start goes on). Set it above the model's cold "
                                 "start (docs/operations.md).")

    @model_validator(mode="after")
    def _deployed_here_or_routed(self):
        if self.application is None:
            if self.source is None:
                raise ValueError("source is required (or `application`, naming the Serve application that deploys "
                                 "this model)")
            return self
        if self.kind == "image":
            raise ValueError("an image model cannot name an `application`: the ingress checks image requests "
                             "against the model's engine config, so the hub deploys image models itself")
        elsewhere = sorted(k for k in _MODEL_APP_ONLY   # by value: the ingress gets the entry back dumped whole
                           if getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True))
        if elsewhere:
            raise ValueError(f"with `application` set this entry only routes to the model; move "
                             f"{', '.join(f'`{k}`' for k in elsewhere)} to the args of application "
                             f"{self.application!r} (ingress.app:build_model_app)")
        return self

    @model_validator(mode="after")
    def _autoscaling_kind_defaults(self):
        scaling = self.deployment.autoscaling_config
        if scaling is not None:
            if scaling.policy not in self.autoscaling_policies():
                raise ValueError(f"deployment.autoscaling_config.policy {scaling.policy!r} does not apply to "
                                 f"{self.kind} models (allowed: {', '.join(map(repr, self.autoscaling_policies()))})")
            self.deployment.autoscaling_config = scaling.with_defaults(self.autoscaling_defaults(scaling.policy))
        return self

    def autoscaling_policies(self) -> tuple[str, ...]:
        """The autoscaling_config.policy values this kind can follow."""
        return ("requests",)

    def autoscaling_defaults(self, policy: str = "requests") -> dict[str, Any]:
        """What this kind's autoscaling fields default to when the config leaves them unset."""
        return {}

    def card(self, created: int) -> ModelCard:
        """What /v1/models shows, from the config alone (the deployment adds what only the loaded
        model knows: a chat model's context length without max_model_len, an embedding's dimensions)."""
        raise NotImplementedError

    @property
    def min_replicas(self) -> int:
        scaling = self.deployment.autoscaling_config
        return scaling.min_replicas if scaling is not None else (self.deployment.num_replicas or 1)


class ChatModelConfig(_ModelBase):
    kind: Literal["chat"] = Field(description="Serves /v1/chat/completions, /v1/completions, /tokenize and /detokenize.")
    engine: LLMEngineConfig = Field(default_factory=LLMEngineConfig)

    def autoscaling_policies(self) -> tuple[str, ...]:
        return ("requests", "queue_depth")

    def autoscaling_defaults(self, policy: str = "requests") -> dict[str, Any]:
        # A replica is busy, not overloaded, while its batch fills: aim for half a batch in flight per
        # replica, counted in requests or in sequences (so both policies agree on n=1 traffic).
        # Loading takes long, so add replicas soon and remove them late.
        half = max(1, self.engine.max_num_seqs // 2)
        target = {"target_sequences_per_replica": half} if policy == "queue_depth" else {"target_ongoing_requests": half}
        return {**target, "upscale_delay_s": 15.0, "downscale_delay_s": 300.0}

    def card(self, created: int) -> ModelCard:
        return ModelCard(id=self.id, kind="chat", created=created, owned_by=self.owned_by,
                         capabilities=["chat.completions", "completions", "tools", "logprobs", "streaming",
                                       "tokenize"],
                         context_length=self.engine.max_model_len)


class EmbeddingModelConfig(_ModelBase):
    kind: Literal["embedding"] = Field(description="Serves /v1/embeddings, and /v1/rerank and /v1/score by cosine similarity.")
    engine: EmbeddingEngineConfig = Field(default_factory=EmbeddingEngineConfig)

    def autoscaling_defaults(self, policy: str = "requests") -> dict[str, Any]:
        # Requests are short and batched: a replica is full at about one batch in flight; it loads fast.
        return {"target_ongoing_requests": max(1, self.engine.max_batch_size // 2),
                "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}

    def card(self, created: int) -> ModelCard:
        return ModelCard(id=self.id, kind="embedding", created=created, owned_by=self.owned_by,
                         capabilities=["embeddings"])


class ImageModelConfig(_ModelBase):
    kind: Literal["image"] = Field(description="Serves /v1/images/generations.")
    engine: ImageEngineConfig = Field(default_factory=ImageEngineConfig)

    def autoscaling_defaults(self, policy: str = "requests") -> dict[str, Any]:
        # One batch runs while the next gathers: more in flight than that waits seconds per request.
        return {"target_ongoing_requests": self.engine.max_batch_size,
                "upscale_delay_s": 10.0, "downscale_delay_s": 300.0}

    def card(self, created: int) -> ModelCard:
        return ModelCard(id=self.id, kind="image", created=created, owned_by=self.owned_by,
                         capabilities=["images.generations"], image_sizes=list(self.engine.sizes),
                         max_images=self.engine.max_n)


class RerankModelConfig(_ModelBase):
    kind: Literal["rerank"] = Field(description="Serves /v1/rerank and /v1/score with a sentence-transformers CrossEncoder.")
    engine: RerankEngineConfig = Field(default_factory=RerankEngineConfig)

    def autoscaling_defaults(self, policy: str = "requests") -> dict[str, Any]:
        # Batched like embeddings: a replica is full at about one batch in flight; it loads fast.
        return {"target_ongoing_requests": max(1, self.engine.max_batch_size // 2),
                "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}

    def card(self, created: int) -> ModelCard:
        return ModelCard(id=self.id, kind="rerank", created=created, owned_by=self.owned_by,
                         capabilities=["rerank", "score"])


# A model in its own application: the hub's entry holds what the ingress reads, the application the rest.
_MODEL_APP_ONLY = {"source", "engine", "deployment"}
_HUB_ONLY = {"application", "owned_by", "cold_start_timeout_s"}

ModelConfig = Annotated[Union[ChatModelConfig, EmbeddingModelConfig, ImageModelConfig, RerankModelConfig],
                        Field(discriminator="kind")]


class RateLimits(StrictModel):
    """Per-subject limits, summed over every ingress replica. Unset: no limit of that kind."""

    requests_per_minute: Optional[int] = Field(None, ge=1, description="Requests admitted per minute (a token "
                                               "bucket holding one minute's worth, refilled continuously).")
    tokens_per_minute: Optional[int] = Field(
        None, ge=1, description="Tokens per minute: a request reserves its estimated prompt tokens plus its "
                                "max_tokens (times n) and is settled against its actual usage when it ends.")
    concurrent_requests: Optional[int] = Field(None, ge=1, description="Requests in flight at once.")

    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute,
                                          self.concurrent_requests))


class ApiKeyEntry(StrictModel):
    """A static API key known by its SHA-256, with the models and limits of its holder."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the key (`printf %s KEY | "
                                                                "sha256sum`); the key itself never goes here.")
    subject: str = Field(min_length=1, max_length=128, description="Who holds the key: the label of its limits "
                                                                   "and usage metrics.")
    models: Optional[list[str]] = Field(None, description="Model ids (glob patterns) this key may use; "
                                                          "unset: auth.default_models.")
    limits: Optional[RateLimits] = Field(None, description="This key's limits; unset: auth.limits.")


JwtAlgorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                       "ES256", "ES384", "ES512", "EdDSA"]


class JwtConfig(StrictModel):
    """Bearer JWTs verified with PyJWT. HS* use a shared secret; RS*/PS*/ES*/EdDSA a public key or a JWKS."""

    algorithms: list[JwtAlgorithm] = Field(min_length=1, description="The only algorithms accepted (a token "
                                           "whose header names another, or 'none', is refused).")
    secret_env: Optional[str] = Field(None, description="Environment variable holding the HS* shared secret.")
    secret_file: Optional[str] = Field(None, description="File holding the HS* shared secret.")
    public_key_file: Optional[str] = Field(None, description="PEM public key for RS*/PS*/ES*/EdDSA tokens.")
    jwks_url: Optional[str] = Field(None, pattern=r"^https?://", description="JWKS URL (http or https); keys "
                                    "are picked by the token's `kid`, cached, and refetched on an unknown kid.")
    jwks_file: Optional[str] = Field(None, description="Path of a JWKS file, read like jwks_url.")
    jwks_cache_s: float = Field(300, gt=0, description="How long a fetched JWKS is trusted before it is refetched.")
    jwks_refetch_cooldown_s: float = Field(
        10, ge=0, description="Least time between two fetches forced by unknown kids (bounds the fetches "
                              "that tokens with made-up kids can cause).")
    issuer: Optional[str] = Field(None, description="Required `iss`; unset: not checked.")
    audience: Optional[list[str]] = Field(None, description="Accepted `aud` values; unset: a token carrying an "
                                                            "`aud` is refused (PyJWT's rule).")
    leeway_s: float = Field(30, ge=0, le=300, description="Clock skew allowed on exp, nbf and iat.")
    require: list[str] = Field(["exp", "sub"], description="Claims a token must carry.")
    subject_claim: str = Field("sub", description="Claim naming the subject (limits and usage are per subject).")
    models_claim: str = Field("models", description="Claim listing the model ids (glob patterns) the token "
                                                    "may use; absent: auth.default_models.")
    limits_claim: Optional[str] = Field(
        None, description="Claim holding per-token limits ({requests_per_minute, tokens_per_minute, "
                          "concurrent_requests}); absent or unset: auth.limits.")

    @model_validator(mode="after")
    def _keys_for_algorithms(self):
        hs = any(a.startswith("HS") for a in self.algorithms)
        asym = any(not a.startswith("HS") for a in self.algorithms)
        if hs != bool(self.secret_env or self.secret_file):
            raise ValueError("HS* algorithms need secret_env or secret_file, and a secret needs an HS* algorithm")
        if asym != bool(self.public_key_file or self.jwks_url or self.jwks_file):
            raise ValueError("RS*/PS*/ES*/EdDSA algorithms need public_key_file, jwks_url or jwks_file, and "
                             "those need such an algorithm")
        if sum(bool(x) for x in (self.public_key_file, self.jwks_url, self.jwks_file)) > 1:
            raise ValueError("set one of public_key_file, jwks_url and jwks_file")
        if self.secret_env and self.secret_file:
            raise ValueError("set secret_env or secret_file, not both")
        return self


class AuthConfig(StrictModel):
    """Who may call the API, which models each caller may use, and how fast. With no keys and no
    jwt, auth is off: every request is served as subject 'anonymous', unlimited (docs/auth.md)."""

    api_keys_env: Optional[str] = Field(
        None, description="Environment variable holding comma-separated API keys. Keys never go in this file.")
    api_keys_file: Optional[str] = Field(None, description="File holding API keys, one per line ('#' comments).")
    keys: list[ApiKeyEntry] = Field(default_factory=list, description="Keys known by their SHA-256, with a "
                                    "subject, models and limits; a key from api_keys_env/_file that matches "
                                    "one of them gets its settings.")
    jwt: Optional[JwtConfig] = None
    default_models: list[str] = Field(["*"], description="Models (glob patterns) for credentials that name none.")
    limits: RateLimits = Field(default_factory=RateLimits, description="Limits of subjects that carry none.")
    default_reserved_completion_tokens: int = Field(
        1024, ge=0, description="tokens_per_minute reservation for a request that sets no max_tokens.")
    rate_limit_failure: Literal["open", "closed"] = Field(
        "open", description="When the shared limit store cannot be reached: 'open' admits requests unlimited "
                            "(logged), 'closed' answers 503 until it is back.")
    rate_limit_lease_fraction: float = Field(
        0.02, gt=0, le=1, description="Share of a limit an ingress replica takes from the shared store at once and "
                                      "spends locally; a share unused for two sync periods goes back.")
    rate_limit_sync_s: float = Field(0.5, gt=0, description="How often a replica looks for idle shares to return.")
    image_url_secret_env: Optional[str] = Field(
        None, description="Environment variable holding the HMAC secret of image URLs (unset: the image "
                          "store makes one that lives as long as its images).")
    image_url_secret_file: Optional[str] = Field(None, description="File holding the HMAC secret of image URLs.")

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file or self.keys or self.jwt)

    @model_validator(mode="after")
    def _limits_need_credentials(self):
        if self.limits.any() and not self.enabled:
            raise ValueError("auth.limits are per subject and need credentials: set api_keys_env, "
                             "api_keys_file, keys or jwt")
        return self

    def limited(self) -> bool:
        """Whether any subject can have a limit (so the shared limit store is needed)."""
        return (self.limits.any() or any(k.limits and k.limits.any() for k in self.keys)
                or bool(self.jwt and self.jwt.limits_claim))


class RequestLimits(StrictModel):
    """Caps checked at the ingress before any model work (body read, tokenizing, queueing). Over a
    cap: 413 for the body, 400 naming the cap for the rest; a request that can never fit is never
    a 503."""

    max_body_bytes: int = Field(
        16 << 20, ge=1024, description="Largest request body in bytes; a larger one gets 413, decided from "
                                       "Content-Length, or while a chunked body streams in, before it is all read.")
    max_messages: int = Field(2048, ge=1, description="Most chat `messages` in one request.")
    max_tools: int = Field(128, ge=1, description="Most `tools` in one chat request.")
    max_stop_chars: int = Field(1024, ge=1, description="Longest `stop` string, in characters.")
    max_logit_bias: int = Field(1024, ge=1, description="Most `logit_bias` entries.")
    max_stop_token_ids: int = Field(64, ge=1, description="Most `stop_token_ids` (vLLM's sampling extension).")
    max_bad_words: int = Field(64, ge=1, description="Most `bad_words` (vLLM's sampling extension); each is at most "
                               "`max_stop_chars` long.")
    max_prompt_chars: int = Field(
        1 << 20, ge=1, description="Characters of prompt text in one chat or completions request (all messages, "
                                   "or all prompts; token-id prompts count one per id), checked before tokenizing.")
    max_embedding_inputs: int = Field(2048, ge=1, le=2048, description="Most `input` items per embeddings request.")
    max_embedding_input_chars: int = Field(
        100_000, ge=1, description="Longest embeddings `input` item, in characters (or token ids).")
    max_schema_bytes: int = Field(
        65536, ge=256, description="Largest `response_format` JSON schema or `structured_outputs` "
                                   "constraint (serialized); bigger is a 400.")
    request_timeout_s: float = Field(
        600.0, ge=0, description="Total time one request may take, streams included; then it ends (504, or an "
                                 "SSE error event for a stream that started) and its model work stops. 0: no limit.")
    stream_idle_timeout_s: float = Field(
        120.0, ge=0, description="Longest wait for a stream's next chunk; then it ends with an SSE error event "
                                 "and its model work stops. 0: no limit.")


class ClientLimits(StrictModel):
    """Per-client limits checked first, before the body is read and before authentication, so a flood
    from one address (refused bodies, bad credentials) cannot take the ingress's CPU from everyone
    else. A client is its network address: the peer's, or with `trusted_proxies` the last address in
    `X-Forwarded-For` that is not a trusted proxy; IPv6 addresses count per /64 (what one host gets).
    Each ingress replica keeps its own counts, so the hub admits up to replicas x the rate: a flood
    guard, not a quota (per-key quotas are `auth.limits`). /health and /ready are never limited."""

    requests_per_s: Optional[float] = Field(
        None, gt=0, description="Requests one client may start per second, sustained; beyond it 429 with "
                                "Retry-After. None: no per-client rate.")
    burst: int = Field(100, ge=1, description="Requests one client may start at once before the rate applies.")
    max_concurrent: Optional[int] = Field(
        None, ge=1, description="Requests one client may have in flight (bodies being read included); "
                                "beyond it 429. None: no cap.")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Networks (CIDR) of load balancers whose `X-Forwarded-For` is "
                                          "believed; from any other peer the header is ignored.")
    max_clients: int = Field(100_000, ge=1, description="Clients tracked at once per replica; the least "
                                                        "recently seen is forgotten first.")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress
        for net in value:
            ipaddress.ip_network(net, strict=False)   # ValueError names the bad entry
        return value

    @property
    def enabled(self) -> bool:
        return self.requests_per_s is not None or self.max_concurrent is not None


class IngressConfig(StrictModel):
    """The HTTP side."""

    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Request size caps and timeouts.")
    client_limits: ClientLimits = Field(default_factory=ClientLimits,
                                        description="Per-client (network address) limits before authentication.")
    image_url_ttl_s: int = Field(3600, ge=1, description="Lifetime of images served by URL.")
    image_store_bytes: int = Field(1 << 30, ge=1, description="Most bytes of images the image store keeps.")
    image_quota_bytes: int = Field(
        256 << 20, ge=1, description="Most bytes of images one subject keeps in the store; over it, that "
                                     "subject's own oldest images go first (never another subject's).")
    log_prompts: bool = Field(False, description="Log prompt text (off by default for privacy).")
    public_url: Optional[str] = Field(
        None, description="Base URL clients reach this server at, for image URLs (default: the request's Host).")
    single_event_loop: bool = Field(
        True, description="Run the ingress replica's request handling and its handles' router on the replica's "
                          "own event loop, not a thread and a loop each (Serve's "
                          "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, "
                          "two of the settings RAY_SERVE_THROUGHPUT_OPTIMIZED makes): a burst is refused sooner "
                          "(bench/README.md, session 11). Set in the ingress replica's "
                          "runtime_env env_vars, where ray_actor_options does not set them already.")
    coalesce_embeddings: bool = Field(
        True, description="Merge concurrent embedding requests for one model into one handle call at the "
                          "ingress (fewer Ray hops per request).")
    coalesce_max_batch: int = Field(64, ge=1, description="Most embedding requests merged into one handle call.")
    coalesce_max_in_flight: int = Field(
        2, ge=1, description="Handle calls per embedding model in flight from one ingress replica; "
                             "requests arriving beyond them wait and go out together.")
    coalesce_max_pending: int = Field(
        4096, ge=1, description="Embedding requests one ingress replica holds waiting for a handle call, per "
                                "model; beyond it the answer is 503 with Retry-After.")

    @model_validator(mode="after")
    def _scales_on_requests(self):
        scaling = self.deployment.autoscaling_config
        if scaling is not None and scaling.policy != "requests":
            raise ValueError(f"ingress.deployment.autoscaling_config.policy {scaling.policy!r} applies to chat "
                             "models only; the ingress scales on requests")
        return self


class AppConfig(StrictModel):
    """The application: a list of models behind one OpenAI-compatible ingress."""

    models: list[ModelConfig] = Field(min_length=1, description="The models to serve, one deployment each. "
                                      "`kind` picks the endpoints a model answers and its keys (below).")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="The HTTP side.")

    @model_validator(mode="after")
    def _unique_ids(self):
        seen: set[str] = set()
        for m in self.models:
            if m.id in seen:
                raise ValueError(f"model id {m.id!r} appears twice")
            seen.add(m.id)
        return self


class ModelAppConfig(StrictModel):
    """The application of one model that the hub routes to (`import_path: ingress.app:build_model_app`,
    `route_prefix: null`): the model's deployment alone, no ingress, no HTTP route. The hub's entry for the
    model names this application in `application`; redeploying this application alone changes this model only."""

    model: ModelConfig = Field(description="The model's config, as a model of the hub takes it, without what the "
                                           "hub's entry holds (application, owned_by, cold_start_timeout_s).")

    @field_validator("model", mode="before")
    @classmethod
    def _hub_fields_stay_in_the_hub(cls, v: Any) -> Any:
        hub_only = sorted(set(v) & _HUB_ONLY) if isinstance(v, dict) else []   # before the entry's own checks
        if hub_only:
            raise ValueError(f"{', '.join(f'`{k}`' for k in hub_only)} belong in the hub's entry for this model "
                             f"(the one whose `application` names this application): the ingress reads them there")
        return v


class ConfigError(ValueError):
    """Raised at startup for an invalid serve_config.yaml `args`; the message says what to fix."""


def parse_app_config(args: dict[str, Any]) -> AppConfig:
    return _parse(AppConfig, args)


def parse_model_app_config(args: dict[str, Any]) -> ModelAppConfig:
    return _parse(ModelAppConfig, args)


def _parse(root: type[StrictModel], args: dict[str, Any]) -> Any:
    try:
        return root.model_validate(args)
    except ValidationError as exc:
        raise ConfigError("invalid application config:\n" + "\n".join(
            _explain(err, root) for err in exc.errors())) from None


def _explain(err: dict[str, Any], root: type[StrictModel]) -> str:
    raw = list(err["loc"])
    where = ".".join(str(p) for p in raw if p not in _KINDS)
    if err["type"] != "extra_forbidden":
        return f"  {where}: {err['msg']}"
    allowed = _allowed_keys(raw[:-1], root)
    hint = difflib.get_close_matches(str(raw[-1]), allowed, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"  unknown key {where!r}{suggestion} (allowed here: {', '.join(sorted(allowed))})"


_KINDS = {"chat": ChatModelConfig, "embedding": EmbeddingModelConfig, "image": ImageModelConfig,
          "rerank": RerankModelConfig}


def _allowed_keys(loc: list, root: type[StrictModel]) -> list[str]:
    """Field names of the config model found by walking a validation error's `loc` from `root`."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if part in _KINDS and model is _ModelBase:
            model = _KINDS[part]
            continue
        if part in ("models", "model") and model in (AppConfig, ModelAppConfig):
            model = _ModelBase
            continue
        field = model.model_fields.get(part)
        model = _first_model(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields)


def _first_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", ()):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None
