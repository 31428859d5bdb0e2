"""MIN-Merging (Liang, 2025): important neurons per task, a router, routed inference.

`params.py` (the method's parameters), `calibration.py` (the router's calibration texts from a
config), `importance.py` (activation-aware and data-free neuron scores, top-row masks, overlap),
`router.py` (the router and its out-of-domain threshold), `routed.py` (θ_shared + per-task neuron
patches applied as per-input row updates inside one batched forward, save and load), `build.py`
(enhancement, θ_shared, router calibration), `evaluate.py` (routed scores through the harness).
The pipeline steps live in `tasks/calibrate.py`; the MLflow pyfunc in `tasks/routed_model.py`.
"""
