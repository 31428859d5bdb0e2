"""Exceptions raised by the merging library; every message names the file, tensor or field."""

from __future__ import annotations


class MergeflowError(Exception):
    """Base class: a bad input or a failed merge, with a message meant for the user."""


class ConfigError(MergeflowError):
    """The merge configuration is invalid (names the file and the key)."""


class CheckpointError(MergeflowError):
    """A checkpoint file cannot be read safely (names the file and, where known, the tensor)."""


class PlanError(MergeflowError):
    """The models cannot be merged together (names every mismatching tensor)."""


class NonFiniteError(MergeflowError):
    """A weight holds NaN or Inf (names the tensor and the model)."""
