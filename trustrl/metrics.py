"""Per-iteration metrics: JSONL (one object per line) and TensorBoard event files.

Only process 0 writes (multi-host runs compute the same metrics on every host).
"""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np


def to_python(metrics: dict) -> dict:
    """Device scalars -> Python floats / ints (NaN and inf kept as floats, JSON writes them)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(jax.device_get(v))
        out[k] = v.item() if v.size == 1 else v.tolist()
    return out


class MetricWriter:
    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": int(step), **to_python(metrics)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k.replace("@", "_at_"), v, step)
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    """Reads metrics.jsonl; a later row for the same step (a resumed run) replaces the earlier."""
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]
