"""Serving: continuous-batching scheduler (pure), sampling, the OpenAI-compatible API."""
