"""Locations of the repository's data files, built from the package location (never the CWD)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
INCLUDE_DIR = REPO_ROOT / "include"
PROMPTS_DIR = INCLUDE_DIR / "prompts"
RUBRICS_DIR = INCLUDE_DIR / "rubrics"
TRAINING_DIR = INCLUDE_DIR / "training"
