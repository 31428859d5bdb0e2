"""MIN-Merging (Liang, 2025): important neurons per task, a shared model, a router, routed inference.

Built so far: neuron importance (activation-aware and data-free), top-neuron masks and their
overlap across tasks. The shared model, router and routed model are issue #4's remaining work.
"""
