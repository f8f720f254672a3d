"""Benchmarks of lowrank_optim against torch / bitsandbytes / galore-torch / fira / pytorch-optimizer.

Each module runs as ``python -m benchmarks.<name> [--quick] [--device cpu|cuda]`` and writes
``benchmarks/results/<name>.json`` (``<name>_cuda.json`` on a GPU) plus a PNG plot:

* ``memory``: optimizer-state bytes at LLaMA 60M-7B shapes, closed form (meta device) and measured.
* ``throughput``: optimizer step time (median, p95, refresh, amortized) with synthetic gradients.
* ``convergence``: a small LLaMA-style decoder trained byte-level on a deterministic stdlib corpus.
* ``projectors``: refresh time and captured top-r energy of every registered projector.
* ``quick``: the quick versions of all four and ``results/SUMMARY.md`` (what ``make bench`` runs).
"""
