"""Processes of the local stack: loopback ports, starting servers in their own process group, waiting for
them, and stopping only what was started. Shared by `infra.stack` and the tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path

HOST = "127.0.0.1"


class StackError(RuntimeError):
    """A stack service could not be started, checked or stopped."""


class PortTaken(StackError):
    """A port the stack was told to use is taken by a process it did not start (nothing was started)."""

    def __init__(self, service: str, port: int):
        super().__init__(
            f"{service}: port {port} on {HOST} is taken by a process this stack did not start; "
            f"stop it or choose another port (--{service}-port)"
        )
        self.service = service
        self.port = port


def free_port(avoid: Collection[int] = ()) -> int:
    """Returns a loopback port nothing listens on now, never one of `avoid` (ports promised to a server
    that has not bound them yet: the kernel may hand out a free port twice)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port
    raise StackError(f"no free port on {HOST} outside {len(avoid)} reserved ones")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def executable(name: str) -> str:
    """Returns the path of a console script installed beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name} is not installed (install mergeflow with its dependencies: make install)")
    return found


def alive(pid: int, command: list[str] | None = None) -> bool:
    """Returns whether `pid` runs and, when given, is still the process that ran `command` (not a reused PID)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    if command:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return True  # no /proc: trust the PID
        return any(Path(command[0]).name.encode() in part for part in cmdline[:3])
    return True


def wait_until(check: Callable[[], bool], timeout: float, what: str, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not alive(pid):
            raise StackError(f"{what} exited before it was ready")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.25)
    raise StackError(f"{what} not ready after {timeout:.0f} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except Exception:
        return False


def spawn(command: list[str], env: dict[str, str], log: Path) -> int:
    """Returns the PID of `command` started in its own session (so stopping it stops its children)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return proc.pid


def stop_pid(pid: int, timeout: float = 60.0) -> None:
    """Stops the process group led by `pid`: SIGTERM, then SIGKILL after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
                if done == pid:
                    return
            except ChildProcessError:
                pass
            if not alive(pid):
                return
            time.sleep(0.1)
