"""Reaction signals: datasets built from production reactions (done 15 s-2 min = positive, dismiss
< 5 s = negative), de-identified. Entry points in `tasks.signals.stage`.
"""
