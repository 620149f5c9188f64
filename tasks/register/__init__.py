"""The MLflow registry: runs, versions, aliases champion/challenger (`registry`), the Ollama export
(`ollama`) and the side-by-side listing behind `tuneloop adapters` (`view`).
"""
