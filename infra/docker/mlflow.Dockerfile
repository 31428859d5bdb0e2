# MLflow tracking and registry server with its PostgreSQL driver and boto3 for S3 artifacts.
# Build from the repository root:  docker build -f infra/docker/mlflow.Dockerfile -t mergeflow-mlflow:3.17.2 .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
RUN pip install "mlflow==3.17.2" "pyarrow<26" "psycopg2-binary>=2.9" "boto3>=1.34"
RUN useradd --create-home --uid 10001 mlflow
USER mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
