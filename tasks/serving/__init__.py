"""Serving: the local OpenAI-compatible model server and the router in front of it.

- `tasks.serving.generation`: `ChatModel`, SmolLM2 (transformers) + PEFT LoRA adapters selected by
  model name, with a token loop that honours temperature/top_p/max_tokens/stop/seed.
- `tasks.serving.model_server`: the FastAPI app (`create_app`), `serve()` and
  `running_model_server()`; `python -m tasks.serving.model_server` starts it.

Nothing is imported here so that `import tasks.serving.<module>` stays cheap.
"""

from __future__ import annotations
