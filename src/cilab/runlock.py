"""The lock of a run folder: one writer, or several readers.

A run (new, resumed or overwritten) holds an exclusive
``fcntl.flock`` on ``.cilab-lock`` for its whole life; the file says who
(pid, host, start time). A second run on the same folder is refused at once,
naming the holder. The kernel drops a flock when its process dies, however it
dies, so a lock left by a killed run is stale by construction; a lock whose
recorded pid is dead on this host is stale too (a forked child could have
inherited the descriptor). The lock file is removed when a run ends; one
that is left over means the run was killed (or a reader left while the
lock was being probed: harmless, a lock file no one holds is no lock).
Runs that only read a folder (an evaluation from its checkpoints, a copy)
share the lock: several at once, and no writer meanwhile.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .results import RunFolderError

LOCK = ".cilab-lock"
LOCK_WAIT_S = 1.0  # a probe of the lock (cilab report, a plan) holds it for microseconds: retry that long


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc; None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about the run holding it."""

    pid: int | None
    host: str
    started: str
    proc_start: str | None = None  # /proc start ticks: tells a reused pid from the holder

    def text(self) -> str:
        return f"pid {self.pid}\nhost {self.host}\nstarted {self.started}\nproc_start {self.proc_start or '-'}\n"

    @classmethod
    def parse(cls, text: str) -> "LockInfo":
        kv = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
        try:
            pid = int(kv.get("pid", ""))
        except ValueError:
            pid = None
        start = kv.get("proc_start")
        return cls(pid, kv.get("host", "?"), kv.get("started", "?"), None if start in (None, "-") else start)

    @classmethod
    def mine(cls) -> "LockInfo":
        stat = _proc_stat(os.getpid())
        return cls(os.getpid(), socket.gethostname(), _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                   stat[1] if stat else None)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"

    def dead_here(self) -> bool:
        """True where the holder is known to be gone: on this host, and its pid dead or reused."""
        if self.host != socket.gethostname() or self.pid is None:
            return False  # another machine's pid (a Ray node, a shared filesystem): only the flock can tell
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        stat = _proc_stat(self.pid)
        if stat is None:
            return False
        state, start = stat
        return state in ("Z", "X") or (self.proc_start is not None and start != self.proc_start)


def _read_fd(fd: int) -> LockInfo | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return None
    return LockInfo.parse(text) if text.strip() else None


def _try_flock(fd: int, flag: int) -> bool | None:
    """Whether ``flag`` (LOCK_SH, LOCK_EX) would be granted now on the lock ``fd`` is open on
    (it is released again at once); None on a filesystem without flock."""
    try:
        fcntl.flock(fd, flag | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _only_readers(fd: int) -> bool:
    """Whether the busy lock ``fd`` is open on is held by readers only (a shared lock is granted)."""
    return _try_flock(fd, fcntl.LOCK_SH) is True


def _replace_stale(fd: int, path: Path) -> bool:
    """Remove the stale lock file ``fd`` is open on; False where it cannot (a folder we may not write)."""
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
        return True  # removed, or replaced by someone else already
    except FileNotFoundError:
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _lock_file(folder: Path) -> Iterator[int | None]:
    """``folder``'s lock file opened to probe it (None: there is none)."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def being_read(folder: Path) -> bool:
    """Whether runs that only read ``folder`` (evaluations, copies) hold its lock now."""
    with _lock_file(folder) as fd:
        return fd is not None and _try_flock(fd, fcntl.LOCK_EX) is False and _only_readers(fd)


def holder(folder: Path) -> LockInfo | None:
    """The live run writing ``folder`` (holding its lock exclusively), or None (no lock, or a stale one)."""
    with _lock_file(folder) as fd:
        # A filesystem without flock (None): say nothing rather than guess.
        if fd is None or _try_flock(fd, fcntl.LOCK_SH) is not False:
            return None
        info = _read_fd(fd) or LockInfo(None, "?", "?")
        return None if info.dead_here() else info


class RunLock:
    """The lock of one run folder: ``acquire()`` ... ``release()`` (or ``with``).

    Exclusive (the default) for a run that writes the folder; ``shared`` for one that
    only reads it (an evaluation from its checkpoints, a copy): readers share it, so two
    evaluations of one source run at once, and a writer is refused while any holds it. A reader
    writes nothing into the lock file (there may be several) and, in a folder it cannot
    write (a read-only mount, another user's results) that has no lock file, reads without
    one: no cilab of this user can be writing there either.
    """

    def __init__(self, folder: Path, shared: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.shared = shared
        self.fd: int | None = None

    def _open(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if not (self.shared and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
                raise RunFolderError(f"cannot create the lock {self.path} ({e.strerror or e}); choose another --out "
                                     "or fix its permissions") from None
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # flock needs no write access
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RunFolderError(f"cannot open the lock {self.path} ({e.strerror or e}); fix its permissions") from None

    def acquire(self, wait: float = LOCK_WAIT_S) -> "RunLock":
        deadline = time.monotonic() + wait
        while True:
            fd = self._open()
            if fd is None:  # a reader in a folder it cannot write, without a lock file (see the class)
                return self
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                # Held by readers (they write nothing: the file may still name a dead writer), or
                # by a writer, live or dead.
                read = not self.shared and _only_readers(fd)
                info = None if read else _read_fd(fd)
                if info is not None and info.dead_here() and _replace_stale(fd, self.path):
                    # Held through a descriptor its dead run left to a forked child: the file is
                    # gone (or was replaced already), the child keeps a lock on nothing.
                    os.close(fd)
                    continue
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                who = info.describe() if info else "a process reading it, or one that has not written its pid yet"
                raise RunFolderError(
                    f"{self.folder} is in use by another cilab run ({who}); two runs must not write one folder. "
                    "Wait for it to finish, stop it, or choose another --out"
                ) from None
            except OSError as e:
                os.close(fd)
                raise RunFolderError(f"cannot lock {self.path} ({e}); the filesystem must support flock") from None
            # Locked. The file may have been removed (a run ending) or replaced after we opened it:
            # then we hold a lock on a file nobody else will look at; start again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if not self.shared:
                os.ftruncate(fd, 0)
                os.pwrite(fd, LockInfo.mine().text().encode(), 0)
                os.fsync(fd)
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        # The file goes with its last holder: a reader that others still share it with leaves it.
        # Removed while still held: whoever opened it meanwhile sees another inode and retries.
        try:
            last = not self.shared or fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB) is None
        except OSError:
            last = False
        if last:
            with contextlib.suppress(OSError):
                if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:  # not a newer holder's file
                    os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


