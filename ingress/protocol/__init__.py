"""OpenAI wire models, one module per endpoint family. Pydantic only; no torch, no Ray."""
