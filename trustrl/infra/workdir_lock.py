"""One run per workdir: an exclusive lock held for the run's lifetime.

    with workdir_lock.hold(workdir):
        ...  # the run; a second run on the same workdir fails at start, naming this one

Local workdirs: an OS lock (``fcntl.flock``) on ``WORKDIR/trustrl.lock``, whose content names the
holder (pid, host, start time, command). The kernel releases the lock when its process ends, for
any reason (kill -9 included), so a lock left by a dead run never blocks: its file stays, and the
next run takes the lock over and says whose it was. (flock over NFS depends on the server's lock
support; a workdir on a shared filesystem is better on object storage.)

Object stores (gs://, ...) have no locks: the lock is a lease object ``WORKDIR/trustrl.lock``
holding the owner (a random token), host, pid, start time and the time it was last renewed; a
thread renews it every ``ttl / 4`` seconds. A lease renewed less than ``ttl`` ago (default
``LEASE_TTL_S`` = 120 s) belongs to a live run and is refused, naming the holder; an older one
is stale (its run was killed or lost its host) and is taken over with a notice. A run that ends
deletes its lease; a local lock file is emptied when released, so only a killed run's is named.
Clocks of the hosts involved must agree to well under the ttl. Two runs starting within one
upload of each other are separated by reading the lease back after writing it (the later writer
wins; the earlier sees another owner and stops). A run that finds, when renewing, that its
lease was taken (after a pause longer than the ttl) stops at the next iteration (``check``),
naming the new holder.

``train.train`` takes the lock (on process 0) before it writes anything but a write probe, for
the command line and API callers alike. Within one process the lock is re-entrant (``hold``
inside ``hold`` on the same workdir is a no-op).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from trustrl.infra import storage

LOCK_FILE = "trustrl.lock"
LEASE_TTL_S = float(os.environ.get("TRUSTRL_LEASE_TTL_S", "120"))

_held: dict = {}  # absolute workdir -> the _LocalLock or _Lease this process holds


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


def _owner_info(token: str) -> dict:
    now = time.time()
    return {"owner": token, "host": socket.gethostname(), "pid": os.getpid(),
            "started": now, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "renewed": now, "command": " ".join(sys.argv)[:500]}


def describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
            f"{info.get('started_utc', '?')}")


class _LocalLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd = None
        self.previous = None  # the content a dead holder left

    def acquire(self):
        import fcntl
        from trustrl.infra import storage
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            # held through a read-only descriptor (flock needs no write access), so an open
            # lock never keeps the filesystem from being remounted read-only under the run
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage.storage_error(e, self.path, "create the workdir lock") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_info(fd)
            os.close(fd)
            raise WorkdirLocked(
                f"workdir {os.path.dirname(self.path)} is in use by another run ("
                f"{describe(holder) if holder else 'holder unknown'}; lock {self.path}): wait for "
                f"it to end or use another --workdir") from None
        self.previous = _read_info(fd)
        try:
            self._write(json.dumps(_owner_info(uuid.uuid4().hex)) + "\n")
        except OSError as e:
            os.close(fd)
            raise storage.storage_error(e, self.path, "write the workdir lock") from e
        self.fd = fd

    def _write(self, text: str):
        with open(self.path, "w") as f:  # the same inode: the flock stays on it
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def check(self):
        pass

    def release(self):
        if self.fd is not None:
            try:  # an empty file says "released cleanly"; a killed run leaves its owner info
                self._write("")
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _read_info(fd) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


class _Lease:
    def __init__(self, workdir: str, ttl: float):
        self.path = storage.join(workdir, LOCK_FILE)
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self.info = _owner_info(self.token)
        self.previous = None
        self.lost = None
        self._stop = threading.Event()
        self._thread = None

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale (it cannot be renewed either)

    def acquire(self):
        held = self._read()
        if held is not None:
            age = time.time() - float(held.get("renewed", 0) or 0)
            if held and age < self.ttl:
                raise WorkdirLocked(
                    f"workdir {storage.dirname(self.path)} is in use by another run "
                    f"({describe(held)}; lease {self.path} renewed {age:.0f} s ago, stale after "
                    f"{self.ttl:g} s): wait for it to end or use another --workdir")
            self.previous = held or {"note": "unreadable lease"}
        storage.write(self.path, json.dumps(self.info))
        time.sleep(min(1.0, self.ttl / 100))  # a concurrent writer's upload lands in between
        now = self._read()
        if not now or now.get("owner") != self.token:
            raise WorkdirLocked(f"workdir {storage.dirname(self.path)}: another run "
                                f"({describe(now or {})}) took the lease {self.path} while this "
                                f"one started; use another --workdir")
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name="trustrl-lease")
        self._thread.start()

    def _renew(self):
        while not self._stop.wait(self.ttl / 4):
            try:
                now = self._read()
                if now and now.get("owner") not in (None, self.token):
                    self.lost = now
                    return
                self.info["renewed"] = time.time()
                storage.write(self.path, json.dumps(self.info))
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried, reported late
                self.lost = self.lost or {"error": f"{type(e).__name__}: {e}"}

    def check(self):
        if self.lost and "owner" in self.lost:
            raise WorkdirLocked(f"lost the lease on workdir {storage.dirname(self.path)} to "
                                f"another run ({describe(self.lost)}): this run was paused "
                                f"longer than the lease's {self.ttl:g} s; stopping")

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            now = self._read()
            if now and now.get("owner") == self.token:
                storage.remove(self.path)
        except Exception:  # noqa: BLE001 - an undeleted lease goes stale after ttl
            pass


@contextlib.contextmanager
def hold(workdir: str, *, ttl: float | None = None, announce=print):
    """Holds the workdir's lock for the block (re-entrant within a process). Raises
    WorkdirLocked naming the holder when another live run has it."""
    key = storage.absolute(workdir)
    if key in _held:
        yield _held[key]
        return
    lock = (_Lease(workdir, LEASE_TTL_S if ttl is None else ttl) if storage.is_remote(workdir)
            else _LocalLock(workdir))
    lock.acquire()
    if lock.previous:
        announce(f"notice: took over the lock of workdir {workdir} from a run that ended without "
                 f"releasing it ({describe(lock.previous)})")
    _held[key] = lock
    try:
        yield lock
    finally:
        del _held[key]
        lock.release()


def check(workdir: str):
    """Raises WorkdirLocked if this process held the workdir's lease and lost it."""
    lock = _held.get(storage.absolute(workdir))
    if lock is not None:
        lock.check()
