"""Tagger internals: the one tagger contract, the five taggers, and their backends.

The stage entry points live in `tasks.tag.stage` (what the DAG calls) and the run's settings in
`tasks.tag.config` (`TaggingConfig`); this package holds the pieces:
`taggers` (contract, output schemas, registry, prompts), `embedding` (zero-shot MiniLM
backend with temperature-scaled confidence), `heuristic` (LLM-free hallucination/belief
heuristics, named as such in their output), `runner` (the async attempt loop that records every
failed attempt), `stats` (per-batch statistics and histograms).
"""
