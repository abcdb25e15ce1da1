"""Inference workers: an existing engine (``transformers serve`` on CPU, vLLM's
OpenAI-compatible server on GPU) behind a small front that loads the caller's model,
checks what the engine can do and speaks OpenAI's chat and completion shapes.

The API never loads a model: it resolves the caller's ``model`` to a directory
(``service.modelaccess``), picks a live inference worker from Redis (``registry``) and
streams the worker's answer back unchanged. See docs/architecture.md, "Inference".
"""
