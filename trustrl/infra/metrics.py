"""Per-iteration metrics: JSONL (one object per line) and TensorBoard event files.

Only process 0 writes (multi-host runs compute the same metrics on every host). metrics.jsonl is
kept consistent with the checkpoints: each row is appended and fsynced in one write (a failed
write is truncated away), and a (re)opened MetricWriter repairs the file atomically: a partial
last line (a kill, a full disk) is dropped and so are rows past the resumed iteration, which the
run replays; what a repair drops is kept in metrics.jsonl.removed. The per-row check (every line
must parse as a JSON object with an integer step) is its integrity check: the file grows by a
row each iteration, so a whole-file hash would be stale after every append. TensorBoard event
files are append-only and left as they are: after a resume they may hold a replayed step twice
(TensorBoard draws both points).
"""
from __future__ import annotations

import json
import math
import warnings

import jax
import numpy as np

from trustrl.infra import integrity, storage


def to_python(metrics: dict) -> dict:
    """Device scalars -> Python floats / ints (NaN and inf kept as floats, JSON writes them)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(jax.device_get(v))
        out[k] = v.item() if v.size == 1 else v.tolist()
    return out


def _parse(line: bytes):
    """(row, None) for a valid row, else (None, why)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"not JSON ({e})"
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        return None, "not an object with an integer 'step'"
    return row, None


def _scan(path: str):
    """(rows as (row, raw line), problems as (line number, why), whether the file ends with a
    newline, the raw unreadable lines) of a metrics file."""
    chunks = storage.read_bytes(path).split(b"\n")
    tail = chunks.pop()  # b"" when the file ends with a newline, else an unterminated last line
    rows, problems, bad = [], [], []
    for n, raw in enumerate(chunks + ([tail] if tail.strip() else []), start=1):
        if not raw.strip():
            continue
        row, why = _parse(raw)
        if row is None:
            partial = n == len(chunks) + 1
            problems.append((n, ("partial last line, " if partial else "") + why))
            bad.append(raw)
        else:
            rows.append((row, raw))
    return rows, problems, not tail.strip(), bad


def repair_jsonl(path: str, resume_step: int | None = None) -> dict:
    """Rewrites metrics.jsonl (atomically) without unreadable lines and, when ``resume_step`` is
    given, without rows whose step exceeds it (the resumed run writes them again).

    What it removes is kept first: appended to PATH.removed (trustrl.infra.integrity.keep_removed,
    under a header saying when and why), so a repair never loses a line. Returns
    {"unreadable": [(line number, why)], "replayed": number of rows dropped, "removed_to": the
    side file or None}; prints what it dropped and where it is kept. Nothing is rewritten when
    nothing is dropped."""
    rows, problems, terminated, bad = _scan(path)
    kept = [raw for row, raw in rows if resume_step is None or row["step"] <= resume_step]
    dropped = [raw for row, raw in rows if resume_step is not None and row["step"] > resume_step]
    replayed = len(dropped)
    side = None
    if bad:  # kept before the rewrite: a kill in between leaves a line twice, never nowhere
        side = integrity.keep_removed(path, b"".join(raw + b"\n" for raw in bad),
                                      f"{len(bad)} unreadable line(s) (lines "
                                      f"{', '.join(str(n) for n, _ in problems)})")
    if dropped:
        side = integrity.keep_removed(path, b"".join(raw + b"\n" for raw in dropped),
                                      f"{replayed} row(s) after step {resume_step}, which the "
                                      f"resumed run writes again")
    if problems or replayed or not terminated:  # a complete unterminated row gets its newline
        storage.write(path, b"".join(raw + b"\n" for raw in kept))
        for n, why in problems:
            print(f"metrics: dropped line {n} of {path}: {why} (kept in {side})", flush=True)
        if replayed:
            print(f"metrics: dropped {replayed} rows of {path} after step {resume_step} "
                  f"(the resumed run writes them again; kept in {side})", flush=True)
    return {"unreadable": problems, "replayed": replayed, "removed_to": side}


class MetricWriter:
    def __init__(self, workdir: str, tensorboard: bool = True, resume_step: int | None = None):
        """resume_step: the iteration the run continues from (0 for a fresh start); the existing
        metrics.jsonl is repaired first (see repair_jsonl). None: only unreadable lines go."""
        self.enabled = jax.process_index() == 0
        self.path = storage.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            storage.makedirs(workdir)
            if storage.exists(self.path):
                repair_jsonl(self.path, resume_step)
            if tensorboard:
                from tensorboardX import SummaryWriter
                if storage.is_remote(workdir):
                    _register_tensorboard_scheme(storage.scheme(workdir))
                self._tb = SummaryWriter(storage.join(workdir, "tb"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": int(step), **to_python(metrics)}
        self._append((json.dumps(row) + "\n").encode("utf-8"))
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k.replace("@", "_at_"), v, step)
            self._tb.flush()

    def _append(self, line: bytes):
        storage.append(self.path, line, "append a row to")  # one write; never a partial row (see storage.append)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    """Reads metrics.jsonl; a later row for the same step (a resumed run) replaces the earlier.

    Unreadable lines (a partial row from a killed run) are skipped with a warning naming the
    file and line numbers."""
    raw_rows, problems, _, _ = _scan(path)
    if problems:
        warnings.warn(f"{path}: skipped {len(problems)} unreadable line(s): " + "; ".join(
            f"line {n}: {why}" for n, why in problems), stacklevel=2)
    rows = {row["step"]: row for row, _ in raw_rows}
    return [rows[k] for k in sorted(rows)]


class _RemoteEventFile:
    """A TensorBoard event file on object storage: the records are buffered and every flush
    uploads the whole file again (objects cannot be appended to; an upload replaces the object
    atomically, so TensorBoard never reads a partial record)."""

    def __init__(self, path: str):
        self.path, self._data, self._flushed = path, bytearray(), 0

    def write(self, record: bytes):
        self._data += record

    def flush(self):
        if len(self._data) != self._flushed:
            storage.write(self.path, bytes(self._data))
            self._flushed = len(self._data)

    def close(self):
        self.flush()


class _RemoteEventFiles:
    """tensorboardX's writer factory interface (record_writer.register_writer_factory)."""

    def open(self, path):
        return _RemoteEventFile(path)

    def directory_check(self, path):
        pass  # object-store prefixes need no creation


def _register_tensorboard_scheme(scheme: str):
    """Event files under <scheme>:// go through trustrl.infra.storage (fsspec), replacing
    tensorboardX's own gs:// writer (google-cloud-storage) and its missing az:// etc."""
    from tensorboardX import record_writer
    record_writer.register_writer_factory(scheme, _RemoteEventFiles())
