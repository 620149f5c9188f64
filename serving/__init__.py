"""Serving: the local OpenAI-compatible model server and the router in front of it.

- `serving.generation`: `ChatModel`, SmolLM2 (transformers) + PEFT LoRA adapters selected by
  model name, with a token loop that honours temperature/top_p/max_tokens/stop/seed.
- `serving.model_server`: the FastAPI app (`create_app`), `serve()` and
  `running_model_server()`; `python -m serving.model_server` starts it.

Nothing is imported here so that `import serving.<module>` stays cheap.
"""

from __future__ import annotations
