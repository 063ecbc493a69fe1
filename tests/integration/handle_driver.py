"""Another Ray job calling the hub's models through typed handles (no HTTP): run as
`python -m tests.integration.handle_driver RAY_ADDRESS`; prints one JSON line of what it got, checking
that every result is the typed object the ingress itself receives."""
from __future__ import annotations

import asyncio
import json
import sys


async def main() -> dict:
    from deployments.types import (EmbedRequest, EmbedResult, GenerateChunk, GenerateRequest, GenerateResult,
                                   ImageRequest, ImageResult, SamplingParams)
    from ingress.backends import model_client
    from tests.integration.conftest import CHAT, EMB, IMG
    chat, emb, img = model_client(CHAT, "chat"), model_client(EMB, "embedding"), model_client(IMG, "image")
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    plain = await chat.generate(GenerateRequest("driver-chat", greedy, messages=question))
    stream = chat.generate_stream(GenerateRequest("driver-stream", greedy, messages=question))
    chunks = [c async for c in stream]
    completion = await chat.generate(GenerateRequest("driver-completion", greedy, prompts=["The capital of France is"]))
    vectors = await emb.embed(EmbedRequest(["hello", "world"]))
    image = await img.images(ImageRequest("a red square", n=1, width=64, height=64, seed=1))
    typed = (isinstance(plain, GenerateResult) and isinstance(completion, GenerateResult)
             and all(isinstance(c, GenerateChunk) for c in chunks) and hasattr(stream, "__anext__")
             and isinstance(vectors, EmbedResult) and isinstance(image, ImageResult))
    return {"typed": typed, "chat": plain.choices[0].text, "finish": plain.choices[0].finish_reason,
            "stream": "".join(d.text for c in chunks for d in c.choices), "chunks": len(chunks),
            "stream_usage": chunks[-1].usage.completion_tokens, "completion": completion.choices[0].text,
            "embedding_shape": list(vectors.embeddings.shape), "png": image.pngs[0][:8] == b"\x89PNG\r\n\x1a\n"}


if __name__ == "__main__":
    import ray
    ray.init(address=sys.argv[1], log_to_driver=False)
    print(json.dumps(asyncio.run(main())))
