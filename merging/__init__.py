"""mergeflow's merging library: checkpoint I/O, planning, merge methods. No orchestration here."""

from __future__ import annotations

__version__ = "0.1.0"
