"""MIN-Merging (Liang, 2025): important neurons per task, a router, routed inference.

Built so far (issue #4, library part): neuron importance (activation-aware, data-free), top-row
masks and their overlap across tasks (`importance.py`); the router with its out-of-domain
threshold (`router.py`); the routed model with per-task neuron patches, grouped batched forwards
through `functional_call`, save and load (`routed.py`). Not yet: the MLflow pyfunc wrapper, the
`calibrate_router` pipeline task and the benchmark.
"""
