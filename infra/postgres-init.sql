-- One database per service, as `mergeflow stack up` creates them on the local PostgreSQL.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
