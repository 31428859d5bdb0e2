"""The command line's overrides of a pipeline config, and credentials moved out of its URIs.

`--tracking-uri`, `--storage` and `--runner` replace the config's values and are validated like them.
User info in a URI (`http://user:password@host`) never stays in the config: it goes to the environment
variables the clients read, so Prefect's flow parameters, MLflow params, the card and every artifact
hold no secret.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from merging.config import MergeConfig, parse_config, resolve_paths
from merging.errors import ConfigError
from merging.untrusted import split_credentials


def apply_overrides(
    config: MergeConfig,
    tracking_uri: str | None = None,
    storage: str | None = None,
    runner: str | None = None,
    device: str | None = None,
) -> MergeConfig:
    """Returns the config with the command line's --tracking-uri, --storage, --runner and --device applied
    (validated)."""
    data = config.model_dump(mode="json", exclude_none=True)
    if tracking_uri:
        if "registry" not in data:
            raise ConfigError("--tracking-uri: the config has no registry section (model_name) to register into")
        data["registry"]["tracking_uri"] = tracking_uri
    if storage:
        data["storage"] = {**data.get("storage", {}), "uri": storage}
    if runner:
        data["pipeline"] = {**data.get("pipeline", {}), "runner": runner}
    if device:
        data["pipeline"] = {**data.get("pipeline", {}), "device": device}
    config = parse_config(move_credentials_to_environment(data), "<command line>")
    return resolve_paths(config, Path.cwd())  # a local --storage folder is recorded absolute


def move_credentials_to_environment(data: dict[str, Any]) -> dict[str, Any]:
    """Returns the config data with user info taken out of its URIs and put where the clients read it.

    `http://user:password@host` as a tracking URI becomes MLFLOW_TRACKING_USERNAME/PASSWORD (MLflow's
    basic auth), as an S3 endpoint AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY. The flow's parameters
    (stored by Prefect), MLflow params, the model card and every artifact then hold no secret.
    """
    mlflow_keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        os.environ["MLFLOW_TRACKING_URI"] = _credentials_to_environment(env_uri, mlflow_keys)
    places = [(data.get("registry"), "tracking_uri", mlflow_keys)]
    places.append((data.get("storage"), "endpoint_url", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")))
    for section, key, env_keys in places:
        if section and section.get(key):
            section[key] = _credentials_to_environment(section[key], env_keys)
    return data


def _credentials_to_environment(uri: str, env_keys: tuple[str, str]) -> str:
    """Returns `uri` without user info; the user and password it held are set as `env_keys`."""
    from urllib.parse import unquote

    clean, user, password = split_credentials(uri)
    if user is not None:
        os.environ[env_keys[0]] = unquote(user)
        if password is not None:
            os.environ[env_keys[1]] = unquote(password)
    return clean
