"""The MLflow registry: versions and aliases champion/challenger (`registry`, which re-exports the
names other stages use), training-run logging (`runs`), adapter staging and base-model paths
(`adapters`), the client and tag keys (`tracking`), the Ollama export (`ollama`) and the
side-by-side listing behind `tuneloop adapters` (`view`).
"""
