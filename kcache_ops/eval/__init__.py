"""Accuracy of KCache against dense attention on a real model (``python -m kcache_ops eval``):
perplexity through the decode path at a short and a long context, needle retrieval in several
phrasings, greedy agreement and the attention mass the top N capture; one module per measure,
:mod:`.grid` the configurations, :mod:`.suite` runs them all, :mod:`.summary` the numbers each is
judged on (with its host and device bytes), :mod:`.recommend` the recommended setting,
:mod:`.report` their section of bench/results/REPORT.md."""
