"""Accuracy of KCache against dense attention on a real model (``python -m kcache_ops eval``):
long-text perplexity through the decode path, needle retrieval, greedy agreement and the attention
mass the top N capture; one module per measure, :mod:`.suite` runs them all, :mod:`.report` writes
their section of bench/results/REPORT.md."""
