"""Rollouts from a sampler sub-mesh: train.mode="async", and "sync" on a split layout.

With ``sampler_mesh.devices`` > 0 the run's devices split into a trainer mesh (``mesh``'s
layout over the rest) and a sampler mesh (``sampler_mesh``'s layout), inside the same
multi-controller program (no Pathways). The loop then takes each iteration's rollout from a
``RolloutProducer`` and hands it the trainer's parameters after its updates:

    producer = RolloutProducer(cfg, run, collect, start, key)
    producer.publish(start, state)          # version `start`: the parameters the run starts at
    item = producer.take(it)                # iteration it's rollout (blocks until it is there)
    ... score and updates on the trainer mesh ...
    producer.publish(it + 1, state)         # every train.sync_every iterations (and the last)
    producer.close()

Versions. Version v is the trainer's parameters after v iterations (their rollout dtypes, cast
on the trainer mesh, then ``WeightSync`` onto the sampler mesh). The rollout of iteration j
may use version v only if j - v <= train.max_staleness: the producer waits for it
(back-pressure) instead of sampling staler data, so at most max_staleness + 1 rollouts are ever
queued and nothing is dropped. It samples with the newest version published when it starts
the rollout; every row of a rollout records that version (``Item.version``). With
train.partial_rollouts = C > 0 (async) the rollout is decoded in segments of C tokens and a row
still generating when a newer version is published continues with it
(trustrl.rollout.partial): ``Item.token_versions`` records every token's version, so its mu
stays the exact anchor per token, and ``Item.version`` is the oldest (the bound applies to it).

mode="async" runs the producer in a host thread: it samples iteration j + 1.. on the sampler
mesh while the trainer updates on iteration j (JAX's dispatch releases the GIL while the
programs run; each thread sets its own mesh context). mode="sync" calls the same producer
inline, after the publish, so a sync run on a split layout is the sequential baseline of the
same layout, and async with max_staleness 0 equals it bitwise (tests/training/test_async.py).

Keys and data. The producer follows the loop's key chain (4-way split per iteration, the
rollout key second) from the run's (or the checkpoint's) key, and owns the prompt iterator; each
item carries the iterator's state after it, which the loop checkpoints. A resume therefore
regenerates the rollouts that were in flight from the restored parameters and data position,
deterministically (in flight = sampled, not yet trained on; they are not saved).

Benchmark-only: ``train.emulate_sample_s`` / ``train.emulate_train_s`` sleep inside the sample
and train phases (device time that takes no CPU; benchmarks/async_rl.py).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.core import losses
from trustrl.infra import sharding
from trustrl.rollout.weight_sync import WeightSync

MODES = ("sync", "async")
_POLL_S = 0.05  # how often a waiting thread looks at the stop flag


def split_devices(n_sampler: int, devices) -> tuple[list, list]:
    """(trainer devices, sampler devices): the sampler takes the first n_sampler / P devices of
    each of the P processes (so both meshes span every process)."""
    by_proc = collections.defaultdict(list)
    for d in devices:
        by_proc[d.process_index].append(d)
    if n_sampler % len(by_proc):
        raise ValueError(f"sampler_mesh.devices={n_sampler} is not divisible by the "
                         f"{len(by_proc)} processes (each gives the sampler the same number)")
    k = n_sampler // len(by_proc)
    sampler = [d for p in sorted(by_proc) for d in by_proc[p][:k]]
    trainer = [d for p in sorted(by_proc) for d in by_proc[p][k:]]
    return trainer, sampler


def sampler_device_count(spec, n_devices: int) -> int:
    """sampler_mesh.devices: a count (a whole number >= 1), or a fraction in (0, 1) of the
    devices (rounded; at least 1)."""
    spec = float(spec)
    return max(1, round(spec * n_devices)) if 0 < spec < 1 else int(spec)


def meshes(cfg, devices=None):
    """(trainer mesh, sampler mesh or None) of cfg over ``devices`` (default jax.devices())."""
    devices = list(jax.devices() if devices is None else devices)
    n = sampler_device_count(cfg.sampler_mesh.devices, len(devices)) if split(cfg) else 0
    if not n:
        return sharding.make_mesh(cfg.mesh, devices), None
    if not 0 < n < len(devices):
        raise ValueError(f"sampler_mesh.devices={cfg.sampler_mesh.devices} gives the sampler "
                         f"{n} of {len(devices)} devices; it needs at least 1 and must leave "
                         f"the trainer at least 1")
    if cfg.train.mode == "async" and jax.process_count() > 1:
        raise ValueError(
            f"train.mode='async' with {jax.process_count()} processes is not supported yet: on "
            f"the CPU backend the two threads' cross-process collectives share the processes' "
            f"gloo communicator and deadlocked (docs/async_rl.md); untested on TPU. Use "
            f"train.mode='sync' on the same split layout, or one process")
    trainer, sampler = split_devices(n, devices)
    axes = {a: cfg.sampler_mesh[a] for a in sharding.MESH_AXES}
    try:
        t_mesh = sharding.make_mesh(cfg.mesh, trainer)
    except ValueError as e:
        raise ValueError(f"mesh does not fit the trainer's {len(trainer)} devices "
                         f"({len(devices)} minus sampler_mesh.devices={n}): {e}") from None
    try:
        s_mesh = sharding.make_mesh(axes, sampler)
    except ValueError as e:
        raise ValueError(f"sampler_mesh does not fit the sampler's {n} devices: {e}") from None
    return t_mesh, s_mesh


def split(cfg) -> bool:
    """Whether cfg splits its devices (sampler_mesh.devices > 0; always for mode="async")."""
    sm = cfg.get("sampler_mesh")
    return sm is not None and bool(sm.get("devices", 0))


def local_device(mesh):
    """This process's first device of ``mesh``: a thread's default device, so that the
    arrays it makes without a sharding (keys, permutations, scalars) and the programs on them
    stay on its own mesh. On another mesh's device they would queue behind that mesh's
    programs; with several processes behind a program that waits for this thread's peer, a
    deadlock (the trainer's keys on a sampler device did)."""
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


@dataclasses.dataclass
class Item:
    iteration: int
    version: int          # the trainer iterations in the parameters that sampled every row
    host: Any             # the rollout (numpy; trustrl.rollout.record.Rollout)
    examples: list
    rewards: Any
    extra: dict
    data_state: dict      # the prompt iterator's state after this rollout (checkpointed)
    sample_s: float       # sampling (and rewards) wall time
    wait_s: float         # the producer's wait for an allowed version before sampling
    # partial rollouts (train.partial_rollouts): the version of every response token [B, N]
    # (-1 outside the response); ``version`` is then the oldest, the one the bound applies to
    token_versions: Any = None


@dataclasses.dataclass
class Versioned:
    """What a partial rollout's segments ask for the newest weights (trustrl.rollout.partial):
    ``current() -> (version, parameters on the sampler mesh)``."""
    current: Callable


class _Stopped(Exception):
    pass


class RolloutProducer:
    """Samples iterations start.. on the sampler mesh (see the module docstring)."""

    def __init__(self, cfg, run, collect: Callable, start: int, key):
        """``collect(sampler_params, key) -> (rollout, host rollout, examples, rewards,
        extra metrics)``: one iteration's rollout on the sampler mesh (loop._collect)."""
        self.cfg, self.run, self.collect = cfg, run, collect
        self.asynchronous = cfg.train.mode == "async"
        self.max_staleness = int(cfg.train.max_staleness) if self.asynchronous else 0
        self.sync_every = int(cfg.train.sync_every) if self.asynchronous else 1
        self.emulate_s = float(cfg.train.get("emulate_sample_s", 0.0))
        self.partial = int(cfg.train.get("partial_rollouts", 0)) > 0 and self.asynchronous
        # the train step reads a rollout's own parameters only for the full-vocabulary
        # divergences (mu recomputed from them); otherwise the trainer keeps just the newest
        self.keep_versions = losses.method_spec(cfg.loss.method).divergence == "full"
        self.weight_sync = WeightSync(run.sampler_mesh)
        # the key chain runs on the sampler mesh (threefry: the same bits on any device)
        self._key = jax.random.wrap_key_data(jax.device_put(
            np.asarray(jax.random.key_data(key)), NamedSharding(run.sampler_mesh, P())))
        self._next, self._end = start, int(cfg.train.iterations)
        self._cond = threading.Condition()
        self._params = None          # (version, parameters on the sampler mesh)
        self._trainer_params = {}    # version -> the same parameters on the trainer mesh
        self._items = collections.OrderedDict()
        self._error = None
        self._stop = False
        self._thread = None
        self.counts = collections.Counter()  # version lag -> rollouts trained on

    # -- trainer side -------------------------------------------------------------------------
    def due(self, version: int) -> bool:
        """Whether the trainer publishes after ``version`` iterations."""
        return version % self.sync_every == 0 or version == self._end

    def publish(self, version: int, state) -> dict:
        """Syncs the trainer's parameters after ``version`` iterations to the sampler; returns
        the sync's metrics. Starts the producer thread on the first call (async)."""
        params = sharding.cpu_sync(self.run.rollout_params(state.params))
        on_sampler, metrics = self.weight_sync(params)
        with self._cond:
            self._params = (version, on_sampler)
            if not self.keep_versions:
                self._trainer_params.clear()
            self._trainer_params[version] = params
            self._cond.notify_all()
        if self.asynchronous and self._thread is None:
            self._thread = threading.Thread(target=self._produce_all, name="trustrl-sampler",
                                            daemon=True)
            self._thread.start()
        return metrics

    def take(self, it: int):
        """(Item of iteration it, the rollout parameters on the trainer mesh for the train step:
        those of its version for the full-vocabulary divergences, else the newest, which the
        step does not read; metrics). Blocks in async mode until the producer has it; raises
        the producer's error."""
        t0 = time.perf_counter()
        if not self.asynchronous:
            self._produce(it)
        with self._cond:
            while it not in self._items and self._error is None:
                self._cond.wait(_POLL_S)
            if self._error is not None:
                raise RuntimeError(f"the sampler thread failed at iteration "
                                   f"{self._error[0]}: {self._error[1]!r}") from self._error[1]
            item = self._items.pop(it)
            queued = len(self._items)
            if self.keep_versions:
                params = self._trainer_params[item.version]
                for v in [v for v in self._trainer_params if v < item.version]:
                    del self._trainer_params[v]  # later rollouts never use older versions
            else:  # (unused by the train step: see keep_versions)
                params = self._trainer_params[max(self._trainer_params)]
            self._cond.notify_all()
        lag = it - item.version
        self.counts[lag] += 1
        partial = {}
        if item.token_versions is not None:
            v = item.token_versions
            on = v >= 0
            span = np.where(on, v, -1).max(1) - np.where(on, v, np.iinfo(np.int32).max).min(1)
            partial = {"async/partial_rows": float((span > 0).sum()),
                       "async/token_lag_mean": float((it - v[on]).mean()) if on.any() else 0.0}
        busy = item.sample_s
        metrics = {"async/version_lag": float(lag), "async/queued": float(queued),
                   "async/trainer_wait_s": time.perf_counter() - t0 if self.asynchronous else 0.0,
                   "async/sampler_idle_frac": item.wait_s / max(item.wait_s + busy, 1e-9),
                   "time/sample_s": busy, **partial,
                   **{f"async/lag_count/{k}": float(n) for k, n in sorted(self.counts.items())}}
        return item, params, metrics

    def close(self):
        """Stops the producer (it finishes the program it is in) and waits for it."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    # -- producer side ------------------------------------------------------------------------
    def _newest(self):
        """(version, sampler-mesh parameters) published last: a partial rollout's next
        segment continues with them."""
        with self._cond:
            return self._params

    def _produce_all(self):
        try:
            while self._next < self._end:
                self._produce(self._next)
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, which raises it
            with self._cond:
                self._error = (self._next, e)
                self._cond.notify_all()

    def _produce(self, j: int):
        """Samples iteration j under the sampler mesh's context and default device: in the
        producer thread (async), or inline in the trainer's (sync)."""
        if j != self._next:
            raise RuntimeError(f"rollout of iteration {j} requested, the producer is at "
                               f"{self._next}")
        with jax.set_mesh(self.run.sampler_mesh), jax.default_device(
                local_device(self.run.sampler_mesh)):
            self._sample(j)

    def _sample(self, j: int):
        self._key, k_roll, _, _ = jax.random.split(self._key, 4)  # the loop's key chain
        t0 = time.perf_counter()
        with self._cond:  # back-pressure: an allowed version, then sample with the newest
            while not self._stop and (self._params is None
                                      or j - self._params[0] > self.max_staleness):
                self._cond.wait(_POLL_S)
            if self._stop:
                raise _Stopped
            version, params = self._params
        t1 = time.perf_counter()
        _, host, examples, rewards, extra = self.collect(
            Versioned(self._newest) if self.partial else params, k_roll)
        if self.emulate_s:
            time.sleep(self.emulate_s)
        token_versions = None
        if self.partial:  # its first segment may have started on a newer version than chosen
            token_versions = self.run.rollout_sampler.last_versions
            version = self.run.rollout_sampler.first_version
        item = Item(j, version, host, examples, rewards, extra, self.run.prompt_iter.state(),
                    time.perf_counter() - t1, t1 - t0, token_versions)
        with self._cond:
            self._items[j] = item
            self._next = j + 1
            self._cond.notify_all()

