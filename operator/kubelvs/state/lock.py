"""One kubelvs at a time per state directory: ``fcntl.flock`` on ``<state-dir>/lock``.

A director holds it for its lifetime, a CLI ``apply``/``delete``/``adopt`` for the command. The
holder writes its pid into the file, so the refusal names it. The kernel drops the lock when the
holder dies (even by SIGKILL): a stale lock file never blocks anyone.

    with StateLock(state_dir):          # the CLI
        ...
    lock = StateLock(state_dir).acquire()   # the director, at start; lock.release() at exit
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from kubelvs.state.ownership import OwnershipError


class StateLockedError(OwnershipError):
    """Another process holds the state directory's lock."""

    reason = "StateDirectoryLocked"


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "lock"
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        """Take the lock or raise :class:`StateLockedError` (never waits)."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                pid = int(os.pread(fd, 32, 0).decode().strip() or "0")
                holder = f" (pid {pid})" if pid else ""
            os.close(fd)
            raise StateLockedError(
                self.path, f"another kubelvs{holder} is using this state directory; stop it or use another --state-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
