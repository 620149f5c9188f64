"""Long-running services; they import `tasks.core` only, never a stage (import-linter checks it).

- Model server: `serving.model_server` (the FastAPI app, `serve()`, `running_model_server()`;
  `tuneloop serve-model` starts it) over `serving.generation.ChatModel` (SmolLM2 + PEFT LoRA
  adapters from `serving.adapters`, continuous batching in `serving.batching`).
- Router: `serving.router` (`tuneloop serve-router`): champion/challenger routing
  (`serving.routing`), backends (`serving.upstream`, `serving.proxy`), the interaction log
  (`serving.interactions`) and the reactions API (`serving.reactions`).
- Both speak the OpenAI wire format defined once in `serving.openai_schema` (chat requests,
  completions and chunks, model lists, the error envelope); where they validate a request
  differently, its docstring says how.

Nothing is imported here so that `import serving.<module>` stays cheap.
"""

from __future__ import annotations
