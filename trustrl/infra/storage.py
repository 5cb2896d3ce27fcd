"""Run-directory paths that are local or on object storage (gs://, s3://, az://, ...).

Every file trustrl writes into a workdir (config, metrics, plots, manifests, integrity records,
the trained tokenizer, remote TensorBoard events) goes through these functions. Libraries write
the rest themselves: Orbax the checkpoints (etils epath for its metadata, TensorStore for the
arrays), tensorboardX the event files of a local workdir, tfds's array_record writers the
dataset (always on local disk, see below); the lock file (infra/workdir_lock.py) is a local file
descriptor (flock) or a lease object written through here. A workdir is any path all accept.

A path with a URL scheme (``gs://bucket/runs/x``) is remote and handled by fsspec (gcsfs for
gs://: ``pip install -e '.[gcs]'``); anything else is a local path and keeps the crash-safe
local writes below (fsync before rename). Object stores have no rename and no append, and need
none: an upload replaces an object atomically (a reader sees the old or the new object, never part of
one), so a remote ``write`` is a plain upload and a remote ``append`` rewrites the object.

Remote workdirs keep the files that must be local on the host: tfds builds its array_record
dataset with local writers, so ``task.data_dir`` defaults to ``local_dir(workdir)/data``
(under ``$TRUSTRL_CACHE``, else ``~/.cache/trustrl``), rebuilt on a new machine from the same
task config; the trained tokenizer is kept in the workdir and loaded through a local copy. Tested
against a local GCS emulator (tests/infra/test_storage.py): gcsfs, Orbax and
TensorStore all speak the real GCS JSON API to it.
"""
from __future__ import annotations

import builtins
import errno
import os
import re
import shutil
import uuid
from typing import IO

from trustrl.infra import assets

# ---- Crash-safe local writes and early checks that a run's directories can hold what it will
# write. A write is durable when the data reached the disk (fsync) before the name points at it:
# a kill or power loss at any moment leaves either the old file or the complete new one.
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
    if is_remote(path):
        probe = join(path, f".trustrl-write-probe-{uuid.uuid4().hex}")
        try:
            write(probe, b"trustrl write probe\n")
            remove(probe)
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
    if is_remote(path):
        return
    free = free_bytes(path)
    if free < need:
        raise StorageError(
            errno.ENOSPC, f"not enough free space for {what} in {path}: {free / 2**20:.1f} MiB "
            f"free, needs at least {need / 2**20:.1f} MiB; free space or use another workdir")


# ---- Local or remote paths
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# fsspec implementations to name when a scheme's is not installed
_PACKAGES = {"gs": "gcsfs (pip install -e '.[gcs]')", "gcs": "gcsfs (pip install -e '.[gcs]')",
             "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}


def scheme(path) -> str | None:
    """The URL scheme of a remote path ("gs" for gs://...), None for a local path."""
    m = _URL.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_remote(path) -> bool:
    return scheme(path) is not None


def _fs(path):
    """(fsspec filesystem, path in its terms) of a remote path; a clear error when the scheme
    has no filesystem installed. gs / s3 / az / hf paths use the filesystem instance etils epath
    (so Orbax) uses: one listing cache, which a delete here keeps current for Orbax too."""
    import fsspec
    path = os.fspath(path)
    try:
        if scheme(path) in ("gs", "s3", "az", "hf"):
            from etils.epath import backend
            fs = backend.fsspec_backend.fs(path)
            return fs, fs._strip_protocol(path)
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:
        name = scheme(path)
        need = _PACKAGES.get(name, f"an fsspec implementation for {name}://")
        raise ValueError(f"{path}: {name}:// paths need {need} ({type(e).__name__}: {e})") \
            from None


def check_supported(path):
    """Raises ValueError (naming the package to install) when a remote path's filesystem is
    missing; local paths always pass."""
    if is_remote(path):
        _fs(path)


def join(base, *parts) -> str:
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def absolute(path) -> str:
    """os.path.abspath for a local path; a remote path unchanged (it is absolute)."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def basename(path) -> str:
    return os.path.basename(os.path.normpath(os.fspath(path).rstrip("/")))


def dirname(path) -> str:
    path = os.fspath(path)
    return path.rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(path)


def exists(path) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path) -> bool:
    """A local directory, or a remote prefix holding at least one object."""
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def isfile(path) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, p = _fs(path)
    return fs.isfile(p)


def makedirs(path):
    """os.makedirs(exist_ok=True); nothing for a remote path (prefixes need no creation)."""
    if not is_remote(path):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise storage_error(e, path, "create the directory") from e


def open(path, mode: str = "rb") -> IO:  # noqa: A001 - the module's open, like os.open
    if not is_remote(path):
        return builtins.open(path, mode)
    fs, p = _fs(path)
    return fs.open(p, mode)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write(path, data: bytes | str):
    """Writes the whole file atomically (its directory made if needed, as object stores need
    none): local through atomic_write (temporary file, fsync, rename), remote as one
    upload (which replaces the object atomically)."""
    if not is_remote(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise storage_error(e, parent, "create the directory") from e
        atomic_write(path, data)
        return
    blob = data.encode("utf-8") if isinstance(data, str) else data
    fs, p = _fs(path)
    try:
        fs.pipe_file(p, blob)
    except OSError as e:
        raise storage_error(e, os.fspath(path), "write") from e


def append(path, data: bytes, what: str = "append to"):
    """Appends ``data`` in one write. Local: O_APPEND + fsync, cut back to the old length on
    failure (no partial line is ever left). Remote: the object is read and uploaded again with
    the data at its end (objects cannot be appended to; the upload is atomic)."""
    if is_remote(path):
        old = read_bytes(path) if exists(path) else b""
        try:
            write(path, old + data)
        except StorageError as e:
            raise StorageError(e.errno, e.strerror.replace("cannot write", f"cannot {what}",
                                                               1)) from e
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:  # read-only, missing directory, permissions: named, not raw
        raise storage_error(e, path, what) from e
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise storage_error(e, path, what) from e
    finally:
        os.close(fd)


def remove(path):
    if not is_remote(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise storage_error(e, path, "remove") from e
        return
    fs, p = _fs(path)
    fs.rm_file(p)


def rmtree(path):
    if not is_remote(path):
        shutil.rmtree(path)
        return
    fs, p = _fs(path)
    fs.rm(p, recursive=True)


def files(root) -> dict[str, int]:
    """{path relative to root (with '/'): size in bytes} of every file below root."""
    if not is_remote(root):
        out = {}
        for d, _, names in os.walk(root):
            for n in names:
                full = os.path.join(d, n)
                out[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
        return out
    fs, p = _fs(root)
    p = p.rstrip("/")
    return {k[len(p) + 1:]: int(v["size"]) for k, v in fs.find(p, detail=True).items()
            if v.get("type") != "directory" and k.startswith(p + "/")}


def stored_checksums(root) -> dict[str, str] | None:
    """{relative path: the checksum the object store keeps for the object} (GCS: crc32c,
    computed by the server from the bytes it received), or None for a local directory or a
    store that reports none. Reading it is a listing, not a download."""
    if not is_remote(root):
        return None
    fs, p = _fs(root)
    p = p.rstrip("/")
    found = {k[len(p) + 1:]: v.get("crc32c") for k, v in fs.find(p, detail=True).items()
             if v.get("type") != "directory" and k.startswith(p + "/")}
    return found if found and all(found.values()) else None


def size(path) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = _fs(path)
    return int(fs.size(p))


def move_tree(src, dst):
    """Renames a directory (local: os.rename); remote: every object is copied, then the source
    objects are deleted (object stores have no rename)."""
    if not is_remote(src):
        try:
            os.rename(src, dst)
        except OSError as e:
            raise storage_error(e, dst, f"move {src} to") from e
        return
    for rel in files(src):
        copy_file(join(src, rel), join(dst, rel))
    rmtree(src)


def copy_file(src, dst):
    """Copies one file between any two paths (local or remote, either way)."""
    if not is_remote(src) and not is_remote(dst):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            shutil.copyfile(src, dst)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise storage_error(e, dst, f"copy {src} to") from e
        return
    write(dst, read_bytes(src))


def copy_tree(src, dst):
    """Copies every file below src to the same relative path below dst."""
    for rel in files(src):
        copy_file(join(src, rel), join(dst, *rel.split("/")))


def local_dir(workdir) -> str:
    """A host-local directory for what a remote workdir cannot hold (the tfds dataset and
    the tokenizer's local copy): $TRUSTRL_CACHE (else ~/.cache/trustrl)/workdirs/<scheme>/
    <bucket>/<path>. For a local workdir, the workdir itself."""
    if not is_remote(workdir):
        return os.fspath(workdir)
    rest = [p for p in os.fspath(workdir)[len(scheme(workdir)) + 3:].split("/")
            if p not in ("", ".", "..")]
    return os.path.join(assets.cache_dir(), "workdirs", scheme(workdir), *rest)
