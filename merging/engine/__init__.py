"""The merge engine: planning, the streaming merge, the staged (per-layer) merge, what a merge writes."""
