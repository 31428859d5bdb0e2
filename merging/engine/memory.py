"""Returns peak memory figures of this process: RSS and anonymous (non file-backed) RSS."""

from __future__ import annotations

import re
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")


def read_status_kb(field: str, status: Path = _STATUS) -> int:
    """Returns a /proc status field in kB (0 where /proc is unavailable)."""
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


class PeakMemory:
    """Samples RssAnon in a background thread; `peak_anon_bytes` and `peak_rss_bytes` after stop()."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_anon_kb = read_status_kb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_anon_kb = max(self.peak_anon_kb, read_status_kb("RssAnon"))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon_kb = max(self.peak_anon_kb, read_status_kb("RssAnon"))

    @property
    def peak_anon_bytes(self) -> int:
        return self.peak_anon_kb * 1024

    @property
    def peak_rss_bytes(self) -> int:
        return read_status_kb("VmHWM") * 1024
