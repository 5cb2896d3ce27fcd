"""Integrity records for every file trustrl writes and later reads back.

A single file ``F`` (config.json, filter.json, a warm-start cache entry) gets a record
``F.integrity.json`` holding its size and sha256, written after ``F`` itself (both atomically,
trustrl.infra.storage.write). A directory trustrl builds (the tfds dataset, the trained tokenizer)
gets
one record ``DIR/trustrl_integrity.json`` listing the size and sha256 of every file below it, the
format of the checkpoint manifests (trustrl.infra.checkpoint).

Reading back goes through ``read_file`` / ``verify_tree``, which raise ``IntegrityError`` naming
the file and what differs. What a caller does with it depends on what the file is:

* caches and datasets trustrl can regenerate (warm-start cache, tfds dataset): the mismatch is
  reported and the file rebuilt; the damaged copy is kept aside (``keep_aside``), never deleted;
* the tokenizer and the config of an existing run: refused (rebuilding them would change the run).

A file without a record (written by an older trustrl, or killed between the file and its record)
raises ``MissingRecord``, a subclass, so callers can tell "unverifiable" from "changed".
Repairs that drop content (metrics rows) keep it in a side file (``keep_removed``).
"""
from __future__ import annotations

import hashlib
import json
import time

from trustrl.infra import storage

SUFFIX = ".integrity.json"
TREE_RECORD = "trustrl_integrity.json"


class IntegrityError(ValueError):
    """A file trustrl wrote does not match its integrity record (or has none)."""


class MissingRecord(IntegrityError):
    """The file has no integrity record, so it cannot be verified."""


def record_path(path: str) -> str:
    return f"{path}{SUFFIX}"


def digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_digest(path: str) -> dict:
    h, n = hashlib.sha256(), 0
    with storage.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return {"size": n, "sha256": h.hexdigest()}


def write_file(path: str, data: bytes | str):
    """Writes ``data`` to ``path`` (atomically), then its record."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    storage.write(path, blob)
    write_record(path, blob)


def write_record(path: str, data: bytes | None = None):
    """Records ``data`` (default: the file's current bytes) as the content of ``path``."""
    rec = digest(data) if data is not None else file_digest(path)
    storage.write(record_path(path), json.dumps({"version": 1, **rec}, sort_keys=True) + "\n")


def _load_record(path: str, what: str) -> dict:
    rpath = record_path(path)
    if not storage.exists(rpath):
        raise MissingRecord(f"{path} ({what}) has no integrity record {rpath}, so it cannot be "
                            f"verified")
    try:
        rec = json.loads(storage.read_text(rpath))
        return {"size": int(rec["size"]), "sha256": str(rec["sha256"])}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"the integrity record {rpath} of {path} ({what}) is unreadable "
                             f"({type(e).__name__}: {e})") from None


def _compare(path: str, what: str, want: dict, got: dict, rpath: str):
    if got["size"] != want["size"]:
        raise IntegrityError(f"{path} ({what}) has {got['size']} bytes, {want['size']} when "
                             f"written (truncated or edited; record {rpath})")
    if got["sha256"] != want["sha256"]:
        raise IntegrityError(f"{path} ({what}) changed since it was written (sha256 "
                             f"{got['sha256'][:12]}... != recorded {want['sha256'][:12]}...; "
                             f"record {rpath})")


def read_file(path: str, what: str) -> bytes:
    """The bytes of ``path`` after checking them against its record. Raises IntegrityError
    (MissingRecord when there is no record) naming the file and what differs."""
    want = _load_record(path, what)
    data = storage.read_bytes(path)
    _compare(path, what, want, digest(data), record_path(path))
    return data


def verify_file(path: str, what: str):
    """read_file without keeping the bytes (hashes the file in blocks)."""
    want = _load_record(path, what)
    _compare(path, what, want, file_digest(path), record_path(path))


def record_tree(root: str, exclude=()):
    """Writes ROOT/trustrl_integrity.json: size and sha256 of every file below root."""
    files = {rel: file_digest(storage.join(root, *rel.split("/")))
             for rel in sorted(storage.files(root))
             if rel != TREE_RECORD and not any(rel.startswith(e) for e in exclude)}
    storage.write(storage.join(root, TREE_RECORD),
                  json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True) + "\n")


def verify_tree(root: str, what: str, strict: bool = False):
    """Checks every file listed in ROOT/trustrl_integrity.json (missing, resized, changed); files
    not listed are ignored, or with ``strict`` an error too (a file added to a tokenizer directory
    changes what loads). Raises IntegrityError / MissingRecord naming the first bad file."""
    rpath = storage.join(root, TREE_RECORD)
    if not storage.exists(rpath):
        raise MissingRecord(f"{root} ({what}) has no integrity record {rpath}, so it cannot be "
                            f"verified")
    try:
        files = json.loads(storage.read_text(rpath))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"the integrity record {rpath} of {root} ({what}) is unreadable "
                             f"({type(e).__name__}: {e})") from None
    present = storage.files(root)
    added = sorted(set(present) - set(files) - {TREE_RECORD})
    if strict and added:
        raise IntegrityError(f"{storage.join(root, *added[0].split('/'))} ({what}) was added "
                             f"after it was written (not listed in {rpath})")
    for rel, want in sorted(files.items()):
        full = storage.join(root, *rel.split("/"))
        if rel not in present:
            raise IntegrityError(f"{full} ({what}) is missing (listed in {rpath})")
        # a size that differs fails without hashing (_compare checks the size first)
        got = {"size": present[rel]} if present[rel] != want["size"] else file_digest(full)
        _compare(full, what, want, got, rpath)


def keep_aside(path: str) -> str:
    """Renames a damaged file or directory to PATH.damaged-<unix time> (kept for inspection,
    out of the way of its rebuild) and returns the new name (PATH.damaged-<time>-<n> when that
    name is taken: nothing kept aside earlier is overwritten). Its record moves with it."""
    dst = base = f"{path.rstrip('/')}.damaged-{int(time.time())}"
    n = 0
    while storage.exists(dst) or storage.exists(record_path(dst)):
        n += 1
        dst = f"{base}-{n}"
    if storage.isdir(path):
        storage.move_tree(path, dst)
    else:
        storage.write(dst, storage.read_bytes(path))
        storage.remove(path)
        if storage.exists(record_path(path)):
            storage.write(record_path(dst), storage.read_bytes(record_path(path)))
            storage.remove(record_path(path))
    return dst


def keep_removed(path: str, removed: bytes, why: str) -> str:
    """Appends what a repair of ``path`` removes to PATH.removed (a header line says when and
    why), so nothing a repair drops is lost. Returns the side file's path."""
    side = f"{path}.removed"
    header = f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} removed from {path}: {why}\n".encode()
    storage.append(side, header + removed + (b"" if removed.endswith(b"\n") else b"\n"),
                   "keep removed content in")
    return side


def main(argv=None) -> int:
    """python -m trustrl.infra.integrity {record,check} PATH...: records a file or directory as it
    is
    now (e.g. a tokenizer saved by an older trustrl, known to be the run's original), or checks
    it against its record."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m trustrl.infra.integrity", description=main.__doc__)
    p.add_argument("action", choices=("record", "check"))
    p.add_argument("paths", nargs="+")
    args = p.parse_args(argv)
    bad = 0
    for path in args.paths:
        tree = storage.isdir(path)
        if args.action == "record":
            (record_tree if tree else write_record)(path)
            print(f"recorded {path}")
            continue
        try:
            (verify_tree if tree else verify_file)(path, "checked by hand")
            print(f"ok {path}")
        except IntegrityError as e:
            print(f"error: {e}")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
