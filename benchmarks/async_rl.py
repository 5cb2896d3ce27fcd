"""Asynchronous RL (train.mode="async"): iteration time sync vs async, the overlap, and a model
of the iteration time that predicts the speed-up from the phase times.

Run:
    python benchmarks/async_rl.py            # ~3 minutes on 2 CPU cores
    python benchmarks/async_rl.py --quick    # one balance, short (tests/test_benchmarks.py)

The tiny config on 8 simulated CPU devices split 4 (sampler, data 4) + 4 (trainer, tensor 4).
This machine's 2 cores cannot run two phases at once, so each phase gets an emulated device
time: train.emulate_sample_s / train.emulate_train_s sleep inside the sample / train phase
(no CPU), at three balances. For each balance the same config runs sync (sample, then train,
on the same split layout) and async (max_staleness 1); the time of an iteration is the median
of ``time/iteration_s`` after the first two (compiles).

The model (``predict``), from the sync run's phase medians: rollout A = time/rollout_s (the
sampling S = time/sample_s plus the trainer's share: moving the rollout to the trainer mesh,
advantages), train B = time/score_s + time/update_s (the weight sync included, async/sync_s):
    sequential  A + B
    overlapped  max(S, (A - S) + B)       (the sampler samples while the trainer trains)
The goal: async within 1.15x of max(sample, train) + sync, and the model within 15% of both
measurements.

``--pod`` prints the same model on a pod slice (``pod_table``): with the train phase and
the rollout's full-occupancy part scaling with their chips, a split can only beat the sync
run on the same chips through the decode tail (rows still decoding while most slots idle),
which does not shrink with chips; the table spans the rollout / train ratio and the tail.

Measured 2026-12-07 at commit b399a12 on this repository's CPU VM (2 cores, jax 0.10.2; one
study run beside it at nice 19), `python benchmarks/async_rl.py`:

    | phases (emulated sample / train s) | sync iteration s | async iteration s | speed-up | async / (max(sample, train) + sync) | model sync s (err) | model async s (err) | model speed-up |
    |---|---|---|---|---|---|---|---|
    | balanced (1.00 / 1.00) | 2.133 | 1.096 | 1.95x | 1.021 | 2.128 (-0.2%) | 1.065 (-2.8%) | 2.00x |
    | sample-heavy (1.50 / 0.50) | 2.154 | 1.609 | 1.34x | 1.018 | 2.153 (-0.0%) | 1.572 (-2.3%) | 1.37x |
    | train-heavy (0.50 / 1.50) | 2.144 | 1.593 | 1.35x | 1.021 | 2.149 (+0.3%) | 1.566 (-1.7%) | 1.37x |

(docs/async_rl.md; `--pod`: the pod model's table there.)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configs import default  # noqa: E402
from trustrl.infra.metrics import read_jsonl  # noqa: E402
from trustrl.training import loop  # noqa: E402

BALANCES = {"balanced": (1.0, 1.0), "sample-heavy": (1.5, 0.5), "train-heavy": (0.5, 1.5)}


def config(mode: str, sample_s: float, train_s: float, iterations: int):
    c = default.get_config("tiny")
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 4}
    c.sampler_mesh.devices = 4.0
    c.train.mode = mode
    c.train.max_staleness = 1
    c.train.iterations = iterations
    c.train.emulate_sample_s = sample_s
    c.train.emulate_train_s = train_s
    c.eval.every = 0
    c.checkpoint.every = 0
    return c


def run(mode, sample_s, train_s, iterations, root) -> list[dict]:
    wd = os.path.join(root, f"{mode}_{sample_s}_{train_s}")
    loop.train(config(mode, sample_s, train_s, iterations), wd)
    return read_jsonl(os.path.join(wd, "metrics.jsonl"))[2:]  # after the compiles


def _med(rows, *keys) -> float:
    return float(np.median([sum(r.get(k, 0.0) for k in keys) for r in rows]))


def phases(rows) -> dict:
    return {"A": _med(rows, "time/rollout_s"), "S": _med(rows, "time/sample_s"),
            "B": _med(rows, "time/score_s", "time/update_s"), "sync": _med(rows, "async/sync_s"),
            "iteration": _med(rows, "time/iteration_s")}


def predict(p: dict) -> tuple[float, float]:
    """(sequential, overlapped) iteration time from sync-run phase times (module docstring)."""
    return p["A"] + p["B"], max(p["S"], p["A"] - p["S"] + p["B"])


def pod_iteration(rollout: float, train: float, tail: float, f: float, sync: float = 0.0):
    """Async iteration time on a slice split f (sampler) / 1 - f (trainer), from the sync
    run's phase times on the whole slice: the train phase and the rollout's full-occupancy
    part scale with their chips (train / (1 - f), rollout (1 - tail) / f), the decode tail (the
    fraction ``tail`` of the rollout's wall time in which its slots are not all busy: the last
    long rows) does not shrink with chips and stays rollout x tail."""
    return max(rollout * ((1 - tail) / f + tail), train / (1 - f) + sync)


def pod_table(sync_s: float = 2.0, iteration_s: float = 1000.0):
    """Predicted async speed-ups on a pod slice (docs/async_rl.md): sync iteration
    rollout + train = ``iteration_s`` at rollout / train ratios r and decode tails, with the
    best sampler share f (in steps of 1/32 of the slice, as whole chips of v5p-64) and with
    the even split of configs/qwen3_tpu.py:async; the weight sync ``sync_s`` (16.4 GB of bf16
    Qwen3-8B at the published 0.09-0.42 s per 1.5 GB: 1-4.6 s)."""
    rows = []
    print("| rollout / train (sync) | decode tail | speed-up, f = 1/2 | best f | speed-up, best f |")
    print("|---|---|---|---|---|")
    for r in (0.5, 1.0, 2.0):
        rollout, train = iteration_s * r / (1 + r), iteration_s / (1 + r)
        for tail in (0.0, 0.25, 0.5):
            half = iteration_s / pod_iteration(rollout, train, tail, 0.5, sync_s)
            f = min((k / 32 for k in range(1, 32)),
                    key=lambda f: pod_iteration(rollout, train, tail, f, sync_s))
            best = iteration_s / pod_iteration(rollout, train, tail, f, sync_s)
            rows.append(dict(r=r, tail=tail, half=half, f=f, best=best))
            print(f"| {r:g} | {tail:g} | {half:.2f}x | {f * 32:.0f}/32 | {best:.2f}x |")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--pod", action="store_true", help="only the pod model's table")
    a = ap.parse_args(argv)
    if a.pod:
        return pod_table()
    scale, iterations = (0.3, 4) if a.quick else (1.0, a.iterations)
    balances = {"balanced": BALANCES["balanced"]} if a.quick else BALANCES
    out = {}
    print("| phases (emulated sample / train s) | sync iteration s | async iteration s | "
          "speed-up | async / (max(sample, train) + sync) | model sync s (err) | "
          "model async s (err) | model speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for name, (s, t) in balances.items():
            s, t = s * scale, t * scale
            p_sync = phases(run("sync", s, t, iterations, root))
            p_async = phases(run("async", s, t, iterations, root))
            seq, ovl = predict(p_sync)
            sample, train = p_sync["A"], p_sync["B"] - p_sync["sync"]
            bound = max(sample, train) + p_sync["sync"]
            row = {"sync": p_sync["iteration"], "async": p_async["iteration"],
                   "speedup": p_sync["iteration"] / p_async["iteration"],
                   "vs_bound": p_async["iteration"] / bound,
                   "model_sync": seq, "model_async": ovl,
                   "err_sync": seq / p_sync["iteration"] - 1,
                   "err_async": ovl / p_async["iteration"] - 1}
            out[name] = row
            print(f"| {name} ({s:.2f} / {t:.2f}) | {row['sync']:.3f} | {row['async']:.3f} | "
                  f"{row['speedup']:.2f}x | {row['vs_bound']:.3f} | {seq:.3f} "
                  f"({row['err_sync']:+.1%}) | {ovl:.3f} ({row['err_async']:+.1%}) | "
                  f"{seq / ovl:.2f}x |", flush=True)
    return out


if __name__ == "__main__":
    main()
