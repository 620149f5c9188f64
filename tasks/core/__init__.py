"""Shared core: settings, db + migrations, ids, paths, config helpers, model-weight resolution,
embeddings and the LLM client. Imports no stage and no service (checked by import-linter).
"""
