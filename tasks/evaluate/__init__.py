"""Evaluation of a registered version against the base model: perplexity, rubric pass rate, pairwise
win rate and the HTML model card. Entry point `tasks.evaluate.stage.evaluate_adapter`.
"""
