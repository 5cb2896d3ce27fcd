"""Crash-safe writes and early checks that a run's directories can hold what it will write.

A write is durable when the data reached the disk (fsync) before the name points at it: a kill
or power loss at any moment leaves either the old file or the complete new one, never a
truncated one.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid


# Free space a run needs at the least, checked at its start: the CPU demo writes ~30 MB (two ~10 MB
# checkpoints, the dataset, tokenizer, warm-start cache, TensorBoard). Checkpoints of bigger states
# are checked against their own size (Checkpointer.check_space) once the state exists.
MIN_FREE_BYTES = 64 * 2**20


class StorageError(OSError):
    """A directory of the run cannot be written (read-only, not a directory, full)."""


def fsync_dir(path: str):
    """Makes a rename / create inside ``path`` durable (the directory entry itself is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes | str):
    """Writes ``data`` to ``path`` through a temporary file in the same directory + os.replace.

    On failure (full disk, ...) the temporary file is removed and ``path`` keeps its old content.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    blob = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise storage_error(e, path, "write") from e
    fsync_dir(directory)


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def storage_error(e: OSError, path: str, action: str) -> StorageError:
    """A StorageError naming the path, the action and (for a full disk) the space left."""
    if isinstance(e, StorageError):
        return e
    what = e.strerror or str(e)
    hint = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        probe = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        try:
            hint = f" ({free_bytes(probe) / 2**20:.1f} MiB free); free space or use another workdir"
        except OSError:
            hint = "; free space or use another workdir"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "; the workdir must be on a writable filesystem"
    return StorageError(e.errno, f"cannot {action} {path}: {what}{hint}")


def check_writable(path: str, what: str = "directory"):
    """Creates ``path`` if needed, then writes, fsyncs and deletes a small file in it.

    Catches a read-only filesystem, a path below a regular file or a directory that cannot be
    created before any expensive work runs. Raises StorageError naming the path. A remote path
    (gs://...): a probe object is uploaded and deleted (missing credentials / permissions)."""
    path = os.fspath(path)
    from trustrl import storage
    if storage.is_remote(path):
        probe = storage.join(path, f".trustrl-write-probe-{uuid.uuid4().hex}")
        try:
            storage.write(probe, b"trustrl write probe\n")
            storage.remove(probe)
        except Exception as e:  # noqa: BLE001 - auth / HTTP errors of any fsspec backend
            raise StorageError(errno.EACCES, f"{what} {path} is not writable: "
                               f"{type(e).__name__}: {e}") from e
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parent = path
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        detail = (f"{parent} is a file, not a directory"
                  if parent and os.path.isfile(parent) else e.strerror or str(e))
        raise StorageError(e.errno, f"{what} {path} cannot be created: {detail}") from e
    if not os.path.isdir(path):
        raise StorageError(errno.ENOTDIR, f"{what} {path} is not a directory")
    probe = os.path.join(path, f".trustrl-write-probe-{uuid.uuid4().hex}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"trustrl write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.remove(probe)
    except OSError as e:
        if os.path.exists(probe):
            try:
                os.remove(probe)
            except OSError:
                pass
        raise StorageError(e.errno, f"{what} {path} is not writable: {e.strerror or e}") from e


def check_free_space(path: str, need: int, what: str):
    """Raises StorageError when the filesystem of ``path`` has less than ``need`` bytes free.
    Remote paths (object storage has no free-space figure) always pass."""
    from trustrl import storage
    if storage.is_remote(path):
        return
    free = free_bytes(path)
    if free < need:
        raise StorageError(
            errno.ENOSPC, f"not enough free space for {what} in {path}: {free / 2**20:.1f} MiB "
            f"free, needs at least {need / 2**20:.1f} MiB; free space or use another workdir")
