# mergeflow: the image of the Prefect worker and of the flow runs it starts (CPU torch; no GPU needed).
# Build from the repository root:  docker build -f infra/docker/mergeflow.Dockerfile -t mergeflow:0.1.0 .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MERGEFLOW_HOME=/opt/mergeflow \
    MERGEFLOW_CACHE_DIR=/var/cache/mergeflow \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mergeflow
# The CPU build of torch first (from PyTorch's CPU index), so the pins below do not pull a CUDA build.
COPY constraints.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY merging ./merging
COPY tasks ./tasks
COPY flows ./flows
COPY infra ./infra
COPY deployments ./deployments
RUN pip install -c constraints.txt ".[dask]"

RUN useradd --create-home --uid 10001 mergeflow && mkdir -p /var/cache/mergeflow && chown mergeflow /var/cache/mergeflow
USER mergeflow
ENTRYPOINT []
CMD ["prefect", "worker", "start", "--pool", "mergeflow", "--type", "process"]
