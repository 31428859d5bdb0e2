"""The evaluation harness: tasks and their data, encoders and heads, reports, plots and validation search.

No Prefect or MLflow here: the pipeline's `evaluate` task wraps these functions.
"""

from merging.evaluation.data import Split, TaskSpec, load_split
from merging.evaluation.harness import EvaluationReport, Evaluator, ModelScores
from merging.evaluation.heads import Head, fit_probe, load_head
from merging.evaluation.metrics import accuracy, macro_f1, score

__all__ = [
    "EvaluationReport",
    "Evaluator",
    "Head",
    "ModelScores",
    "Split",
    "TaskSpec",
    "accuracy",
    "fit_probe",
    "load_head",
    "load_split",
    "macro_f1",
    "score",
]
