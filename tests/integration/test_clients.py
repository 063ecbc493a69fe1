"""Real third-party clients, unmodified, against the real app: LangChain (ChatOpenAI, OpenAIEmbeddings),
instructor and LlamaIndex (OpenAILike). They send what they send; the hub must answer it."""
from __future__ import annotations

import pytest
from pydantic import BaseModel

from tests.integration.conftest import CHAT, EMB

PARIS = "What is the capital of France? Answer in one word."


class City(BaseModel):
    name: str
    country: str


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "sunny"


@pytest.fixture(scope="module")
def chat_model(server_url):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=CHAT, base_url=server_url, api_key="unused", temperature=0, max_tokens=40,
                      max_retries=0, timeout=120)


def test_langchain_invoke_and_stream(chat_model):
    assert "Paris" in chat_model.invoke(PARIS).content
    chunks = list(chat_model.stream(PARIS))
    assert len(chunks) > 2 and "Paris" in "".join(c.content for c in chunks)


def test_langchain_stream_usage(chat_model):
    last = None
    for chunk in chat_model.bind(stream_options={"include_usage": True}).stream(PARIS):
        last = chunk if last is None else last + chunk
    assert last.usage_metadata["output_tokens"] > 0 and last.usage_metadata["input_tokens"] > 0


def test_langchain_bind_tools_sends_tools_and_reads_back_the_reply(chat_model):
    reply = chat_model.bind_tools([get_weather]).invoke("What's the weather in Paris? Use the tool.")
    assert reply.tool_calls or reply.content          # the model chooses (tool_choice auto)
    for call in reply.tool_calls:
        assert call["name"] == "get_weather" and isinstance(call["args"], dict)


def test_langchain_bind_tools_forced(chat_model):
    reply = chat_model.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert reply.tool_calls[0]["name"] == "get_weather" and "city" in reply.tool_calls[0]["args"]


def test_langchain_structured_output_json_schema(chat_model):
    city = chat_model.with_structured_output(City, method="json_schema").invoke("Paris is a city in France.")
    assert isinstance(city, City) and city.name


def test_langchain_structured_output_function_calling(chat_model):
    city = chat_model.with_structured_output(City, method="function_calling").invoke("Paris is a city in France.")
    assert isinstance(city, City) and city.name


def test_langchain_embeddings(server_url):
    from langchain_openai import OpenAIEmbeddings
    emb = OpenAIEmbeddings(model=EMB, base_url=server_url, api_key="unused", check_embedding_ctx_length=False,
                           max_retries=0)
    docs = emb.embed_documents(["Paris is in France.", "Bananas are yellow."])
    query = emb.embed_query("Where is Paris?")
    assert len(docs) == 2 and len(docs[0]) == len(query) == 384


@pytest.fixture(scope="module")
def openai_client(server_url):
    import openai
    return openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=120)


def test_instructor_json_schema(openai_client):
    import instructor
    client = instructor.from_openai(openai_client, mode=instructor.Mode.JSON_SCHEMA)
    city = client.chat.completions.create(model=CHAT, response_model=City, max_retries=0, temperature=0,
                                          messages=[{"role": "user", "content": "Paris is a city in France."}])
    assert isinstance(city, City) and city.name


def test_instructor_tools(openai_client):
    import instructor
    client = instructor.from_openai(openai_client, mode=instructor.Mode.TOOLS)
    city = client.chat.completions.create(model=CHAT, response_model=City, max_retries=0, temperature=0,
                                          messages=[{"role": "user", "content": "Paris is a city in France."}])
    assert isinstance(city, City) and city.name


@pytest.fixture(scope="module")
def llama_index_llm(server_url):
    from llama_index.llms.openai_like import OpenAILike
    return OpenAILike(model=CHAT, api_base=server_url, api_key="unused", is_chat_model=True, context_window=8192,
                      temperature=0, max_tokens=40, max_retries=0, timeout=120)


def test_llama_index_chat_and_stream(llama_index_llm):
    from llama_index.core.llms import ChatMessage
    messages = [ChatMessage(role="user", content=PARIS)]
    assert "Paris" in llama_index_llm.chat(messages).message.content
    deltas = [r.delta for r in llama_index_llm.stream_chat(messages)]
    assert len(deltas) > 2 and "Paris" in "".join(d or "" for d in deltas)
