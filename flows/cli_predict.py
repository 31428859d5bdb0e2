"""`mergeflow predict`: batch scoring of a registered (or logged) model on a parquet or CSV file.

`mlflow models predict` reads JSON and CSV only; this reads parquet too, in batches, and writes the
inputs with the predictions beside them (parquet or CSV, by the output's suffix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _read(path: Path) -> Any:
    import pandas as pd

    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise ValueError(f"{path}: expected a .parquet or .csv file")


def cmd_predict(args: argparse.Namespace) -> int:
    import mlflow
    import pandas as pd

    source, target = Path(args.input), Path(args.output)
    try:
        frame = _read(source)
        if target.suffix not in (".parquet", ".csv"):
            raise ValueError(f"{target}: the output must end in .parquet or .csv")
    except (OSError, ValueError) as exc:
        print(f"mergeflow: predict: {exc}", file=sys.stderr)
        return 2
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    model = mlflow.pyfunc.load_model(args.model)
    parts = []
    for start in range(0, len(frame), args.batch_size):
        chunk = frame.iloc[start : start + args.batch_size].reset_index(drop=True)
        answer = pd.DataFrame(model.predict(chunk)).reset_index(drop=True)
        overlap = [c for c in answer.columns if c in chunk.columns]
        parts.append(pd.concat([chunk, answer.drop(columns=overlap)], axis=1))
    result = pd.concat(parts, ignore_index=True) if parts else frame
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    if target.suffix == ".parquet":
        result.to_parquet(tmp)
    else:
        result.to_csv(tmp, index=False)
    tmp.replace(target)
    print(f"predicted {len(result)} rows with {args.model} → {target}")
    return 0


def add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="batch scoring: a model URI on a parquet or CSV file")
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a local MLflow model folder")
    p.add_argument("input", help="input rows (.parquet or .csv), the model's input columns")
    p.add_argument("output", help="inputs plus predictions (.parquet or .csv), written atomically")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_predict)
