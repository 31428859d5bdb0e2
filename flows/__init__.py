"""Prefect flows and the `mergeflow` command line."""
