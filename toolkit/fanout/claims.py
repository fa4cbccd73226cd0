"""Who runs what: an exclusive lock over the queue, and one claim file per run in progress.

A worker takes the lock (flock on OUTPUT_DIR/workers/lock: the kernel drops it if the worker dies, and it
works on NFSv4 and Lustre), reads the queue, writes its claim for the run it picked and lets go. The claim
is OUTPUT_DIR/workers/claims/<run id>.json; while the run goes on the worker touches it every HEARTBEAT_S.
A claim is stale when its worker and the run's process are both gone (same host: checked by pid), or, for a
worker on another host, when it has not been touched for STALE_S. A stale claim's run is taken over by the
next worker that reads the queue, which resumes it from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import ToolkitError

HEARTBEAT_S = 30.0
STALE_S = 300.0


@dataclass
class Claim:
    run: str  # the run's id (toolkit/workers.py: Unit.id)
    worker: str
    host: str
    pid: int  # the worker's
    started: float
    child_pid: int | None = None  # the run's process, once started
    path: str = ""

    def age(self) -> float:
        """Seconds since the last heartbeat."""
        try:
            return time.time() - os.stat(self.path).st_mtime
        except OSError:
            return 0.0

    def alive(self) -> bool:
        if self.host == socket.gethostname():
            return any(_pid_alive(p) for p in (self.pid, self.child_pid) if p)
        return self.age() < STALE_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return _state(pid) != "Z"


def _state(pid: int) -> str:
    try:  # a zombie (killed, not yet reaped by its parent) holds a pid but runs nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


@contextlib.contextmanager
def locked(folder: Path):
    """The queue's lock, held while a worker reads the queue and writes a claim or a result."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def check_lockable(folder: Path) -> None:
    """Before any run starts: the workers' folder can be created, written and locked."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK) or not existing.is_dir():
        raise ToolkitError(f"the workers' folder {folder} cannot be written",
                           "pass an --output-dir in a folder you can write")
    if folder.exists():
        try:
            fd = os.open(folder / "lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        except BlockingIOError:
            pass  # held by a running worker: lockable
        except OSError as err:
            raise ToolkitError(f"the workers' lock {folder / 'lock'} cannot be taken ({err.strerror})",
                               "use an --output-dir on a filesystem with file locks (flock), e.g. not an old NFSv3 "
                               "mount without lockd") from None


def claim_path(folder: Path, run: str) -> Path:
    return folder / "claims" / f"{run}.json"


def read_claims(folder: Path) -> dict[str, Claim]:
    claims = {}
    for path in sorted((folder / "claims").glob("*.json")):
        try:
            claim = Claim(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # being written or removed right now: the lock holder decides about it
        claim.path = str(path)
        claims[claim.run] = claim
    return claims


def write_claim(folder: Path, claim: Claim) -> Claim:
    """Under the lock: this worker's claim on a run (replacing a stale one)."""
    path = claim_path(folder, claim.run)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim.path = str(path)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({k: v for k, v in asdict(claim).items() if k != "path"}))
    os.replace(tmp, path)
    return claim


def release(claim: Claim) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(claim.path)


class Heartbeat:
    """Touches the claim every HEARTBEAT_S while its run goes on (a thread: the worker itself only waits)."""

    def __init__(self, claim: Claim, every: float = HEARTBEAT_S):
        self.claim, self.every, self._stop = claim, every, threading.Event()
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError):
                os.utime(self.claim.path)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
