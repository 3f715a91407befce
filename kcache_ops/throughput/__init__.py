"""Decode throughput of the reference decoder with the ``dense`` backend against KCache at one
device-memory budget (``python -m kcache_ops bench``): random weights in ``--dtype`` (their
values do not change the timing), Llama-3-8B and SmolLM2-135M shapes, each at its own default
contexts (``shapes.DEFAULT_CONTEXTS``, which ``--help`` lists; a context given past a shape's
max_position_embeddings is skipped with a line).

For each (model, context) and backend: the largest batch whose cache fits the budget (from the
cache's own bytes: dense holds K and V on the device, KCache K, the V of its dense layers, its
tail's low-bit copy or V sums, its hot rows and its reuse pool), the prefill timed at batch 1 and
the decode timed at that batch (the median step of ``--steps``, between CUDA events on a GPU),
device and host memory, and the bytes crossing PCIe per decode step (the cache's
``host_bytes_read_per_step``).
In the same run, Hugging Face transformers' LlamaForCausalLM (static cache, SDPA) decodes the dense
shape, so the dense baseline is checked against a common implementation.

The run measures its ceilings first (a device-memory copy; on CUDA a pinned host->device copy)
and each row gives the floor they set on its step and the share of it the step reaches.

shapes.py: the model shapes and random-weight models; ceilings.py: the ceilings, the bytes a
step moves and its floor; measure.py: the timing and the budget fitting;
transformers_baseline.py: the transformers comparison; report.py: the REPORT.md section and the
plot.
"""
