"""Preemption: SIGTERM (TPU maintenance events, spot / preemptible VMs, Kubernetes, Slurm) stops
the run at the next iteration boundary, after a checkpoint, instead of killing it mid-step.

    with preemption.Watcher() as watcher:
        for it in ...:
            ...
            if watcher.should_stop(it + 1):
                save; raise preemption.Preempted(...)

One process: a Python SIGTERM handler sets a flag (the iteration in flight finishes; a rollout
or an update is never cut). Several processes (jax.distributed): jax's own preemption sync
manager receives the signal, and ``multihost_utils.reached_preemption_sync_point`` makes every
process stop at the same iteration, so their checkpoint is consistent; no Python handler is
installed then (it would replace jax's).

SIGINT (Ctrl-C) is handled as SIGTERM: the iteration in flight finishes and is checkpointed, so
nothing since the last periodic checkpoint is lost. With several processes, a SIGINT is turned
into a SIGTERM to this process, which jax's preemption sync manager then handles as above. A
second Ctrl-C while the iteration finishes still waits for it (use SIGKILL to stop at once).
"""
from __future__ import annotations

import os
import signal
import threading

import jax

EXIT_CODE = 128 + signal.SIGTERM  # 143: "terminated by SIGTERM", the checkpoint is safe
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped early on a preemption signal; its last checkpoint is at ``iteration``."""

    def __init__(self, iteration: int, signal_name: str):
        super().__init__(f"preempted ({signal_name}): checkpoint saved at iteration {iteration}; "
                         f"rerun the same command to resume")
        self.iteration = iteration
        self.exit_code = 128 + signal.Signals[signal_name].value  # 143 SIGTERM, 130 SIGINT


class Watcher:
    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.received is None:
            print(f"\n{signal.Signals(signum).name}: stopping after the iteration in flight, "
                  f"with a checkpoint", flush=True)
        self.received = signal.Signals(signum).name

    def _interrupt_as_term(self, signum, frame):  # noqa: ARG002 - several processes
        os.kill(os.getpid(), signal.SIGTERM)  # jax's preemption notifier takes it from here

    def __enter__(self):
        # handlers can only be set from the main thread (e.g. not inside a notebook worker)
        if threading.current_thread() is not threading.main_thread():
            return self
        if jax.process_count() == 1:
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        elif signal.SIGINT in self.signals:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt_as_term)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False

    def should_stop(self, step: int) -> bool:
        """True once a preemption signal arrived (on every process at the same ``step``)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        return self.received is not None
