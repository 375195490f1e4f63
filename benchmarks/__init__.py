"""Benchmarks behind ``make bench``: throughput against open_clip_train, selection
overhead against a cost model, memory (score history and per-rank RSS), accuracy.

``python -m benchmarks.run_all`` runs them and writes ``docs/benchmarks.md``.
"""
