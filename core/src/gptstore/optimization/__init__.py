"""Optimization: strategies applied to artifacts, with data, evaluation and quality gates.

- :mod:`~gptstore.optimization.data`: datasets from text or JSONL files, digests, the default
  corpus;
- :mod:`~gptstore.optimization.evaluation`: measurements through a runner (perplexity);
- :mod:`~gptstore.optimization.gates`: bounds a result must meet to be kept;
- :mod:`~gptstore.optimization.run`: ``gptstore optimize``, one strategy step with lineage.
"""
