"""Asynchronous RL on a split layout (trustrl.training.async_rollouts, trustrl.rollout.weight_sync):
exactness at staleness 0, the staleness bound under slow phases, mu of stale rollouts, resume,
weight sync and the config errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.infra import sharding
from trustrl.infra.metrics import read_jsonl
from trustrl.rollout import weight_sync
from trustrl.training import async_rollouts, config_validation as cv, loop as train, step as ts

from test_config_validation import tiny as _tiny
from test_main import TINY, _main

# a tiny run that learns something (rewards differ within groups: the overlong penalty on a
# 30-step warm start), split 4 trainer (tensor 4) + 4 sampler (data 4) devices
SPLIT = {"mesh.data": -1, "mesh.tensor": 4, "sampler_mesh.devices": 4.0, "train.iterations": 3,
         "eval.every": 0, "checkpoint.every": 0, "optim.learning_rate": 1e-2,
         "rollout.overlong": "penalty", "rollout.overlong_penalty": -1.0, "warmstart.steps": 30,
         "rollout.max_new_tokens": 6, "rollout.dtype": "float32"}


def _run(tmp_path, name, **overrides):
    wd = str(tmp_path / name)
    state, _ = train.train(_tiny(**{**SPLIT, **overrides}), wd)
    return state, read_jsonl(os.path.join(wd, "metrics.jsonl"))


def _math(row):  # everything but wall times and the async bookkeeping
    return {k: v for k, v in row.items() if not k.startswith(("time/", "async/"))}


def _equal_trees(a, b):
    return all(jax.tree.leaves(jax.tree.map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def test_async_at_staleness_0_is_the_sync_run_bitwise(tmp_path):
    """train.mode=async, max_staleness 0 (a sampler thread, back-pressure, the queue) against
    the sequential run of the same layout: the same metrics rows and the same final state."""
    s_sync, rows_sync = _run(tmp_path, "sync")
    s_async, rows_async = _run(tmp_path, "async", **{"train.mode": "async",
                                                     "train.max_staleness": 0})
    assert [_math(r) for r in rows_async] == [_math(r) for r in rows_sync]
    assert all(r["train/grad_norm"] > 0 for r in rows_sync)  # the runs do update
    assert [r["async/version_lag"] for r in rows_async] == [0.0, 0.0, 0.0]
    assert _equal_trees(s_sync.params, s_async.params)
    assert _equal_trees(s_sync.opt_state, s_async.opt_state)


def test_stale_rollouts_record_the_mu_of_their_version(tmp_path, monkeypatch):
    """max_staleness 2 with a slow trainer: the sampler runs ahead, so rollouts lag 1-2
    versions. Every recorded mu equals the log-probs that the parameters of the rollout's
    version give the sampled tokens (recomputed by the trainer's score program), and not
    those of the newest parameters."""
    taken, published = [], {}
    take, publish = async_rollouts.RolloutProducer.take, async_rollouts.RolloutProducer.publish

    def recording_publish(self, version, state):
        out = publish(self, version, state)
        published[version] = self._trainer_params[version]
        return out

    def recording_take(self, it):
        item, params, metrics = take(self, it)
        taken.append((item, published[item.version], self.run, published[max(published)]))
        return item, params, metrics

    monkeypatch.setattr(async_rollouts.RolloutProducer, "publish", recording_publish)
    monkeypatch.setattr(async_rollouts.RolloutProducer, "take", recording_take)
    _, rows = _run(tmp_path, "stale", **{"train.mode": "async", "train.max_staleness": 2,
                                         "train.iterations": 4, "train.emulate_train_s": 1.0})
    lags = [r["async/version_lag"] for r in rows]
    assert max(lags) >= 1 and all(0 <= x <= 2 for x in lags), lags
    checked = 0
    for item, params, run, newest in taken:
        batch = {k: jnp.asarray(v) for k, v in ts.rollout_batch(item.host, jnp.asarray(
            np.zeros(len(item.rewards), np.float32))).items() if v is not None}
        mask = item.host.response_mask > 0
        with jax.set_mesh(run.mesh):
            mu = np.asarray(run.score(run.policy_params(params), batch))
        np.testing.assert_allclose(mu[mask], item.host.rollout_logp[mask], atol=2e-5)
        if item.iteration > item.version:  # stale: the newest parameters do not give mu
            with jax.set_mesh(run.mesh):
                pi = np.asarray(run.score(run.policy_params(newest), batch))
            assert np.abs(pi[mask] - item.host.rollout_logp[mask]).max() > 1e-3
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("slow,max_staleness", [("train", 1), ("sample", 2)])
def test_the_staleness_bound_holds_under_a_slow_phase(tmp_path, slow, max_staleness):
    """A slow trainer lets the sampler run ahead until the bound stops it (lag reaches the
    bound, never exceeds it, at most bound rollouts queued behind the one taken); under a slow
    sampler the bound holds too, and the delay is inside the sample phase. (How long the
    trainer waits is a wall time, not asserted.)"""
    _, rows = _run(tmp_path, slow, **{"train.mode": "async", "train.max_staleness": max_staleness,
                                      "train.iterations": 5, f"train.emulate_{slow}_s": 1.0})
    lags = [r["async/version_lag"] for r in rows]
    assert all(0 <= x <= max_staleness for x in lags), lags
    assert all(r["async/queued"] <= max_staleness for r in rows)
    assert rows[-1]["async/lag_count/0"] + sum(
        rows[-1].get(f"async/lag_count/{k}", 0) for k in range(1, max_staleness + 1)) == 5
    if slow == "train":
        assert max_staleness in lags, lags
    else:
        assert all(r["time/sample_s"] >= 1.0 for r in rows), rows


def test_a_scheduled_run_is_reproducible_whichever_phase_is_slow(tmp_path):
    """train.rollout_version='scheduled' on 2 sampler replicas, max_staleness 2: rollout j
    samples with version max(0, j - 2) however the phases are timed, so a slow trainer and a
    slow sampler give the same run (every metric but the times, and the final state,
    bitwise); the newest-version policy under a slow trainer lags less."""
    flags = {"train.mode": "async", "train.max_staleness": 2, "train.iterations": 5,
             "sampler_mesh.replicas": 2, "train.rollout_version": "scheduled"}
    s_a, rows_a = _run(tmp_path, "slow_trainer", **flags, **{"train.emulate_train_s": 0.5})
    s_b, rows_b = _run(tmp_path, "slow_sampler", **flags, **{"train.emulate_sample_s": 0.5})
    assert [r["async/version_lag"] for r in rows_a] == [0.0, 1.0, 2.0, 2.0, 2.0]
    assert [_math(r) for r in rows_a] == [_math(r) for r in rows_b]
    assert _equal_trees(s_a.params, s_b.params)
    assert all(r["train/grad_norm"] > 0 for r in rows_a)
    _, rows_n = _run(tmp_path, "newest", **{**flags, "train.rollout_version": "newest",
                                            "train.emulate_sample_s": 0.5})
    assert sum(r["async/version_lag"] for r in rows_n) < 7.0  # the sampler is the slow phase


def test_resume_regenerates_in_flight_rollouts_deterministically(tmp_path):
    """Async at staleness 0, checkpointed every iteration: 2 iterations, then the same workdir
    extended to 4, equals 4 iterations in one go (the in-flight rollout of iteration 2 is
    regenerated from the restored parameters and data position)."""
    cfg = {"train.mode": "async", "train.max_staleness": 0, "checkpoint.every": 1}
    whole, rows = _run(tmp_path, "whole", **cfg, **{"train.iterations": 4})
    _run(tmp_path, "parts", **cfg, **{"train.iterations": 2})
    wd = str(tmp_path / "parts")
    parts, _ = train.train(_tiny(**{**SPLIT, **cfg, "train.iterations": 4}), wd)
    rows_parts = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert [_math(r) for r in rows_parts] == [_math(r) for r in rows]
    assert _equal_trees(whole.params, parts.params)


def test_weight_sync_equals_a_host_copy():
    """Trainer-mesh parameters (tensor-sharded) onto a sampler mesh of other devices and
    another layout: the values are the host copy's, each leaf keeps its spec and lives only on
    the sampler's devices; the bytes counted are the tree's."""
    devs = jax.devices()
    src = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 4}, devs[4:])
    dst = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devs[:4])
    rng = np.random.default_rng(0)
    host = {"w": rng.normal(size=(8, 12)).astype(np.float32),
            "b": rng.normal(size=(12,)).astype(np.float32),
            "e": rng.normal(size=(16, 8)).astype(jnp.bfloat16)}
    specs = {"w": P(None, "tensor"), "b": P(), "e": P("tensor", None)}
    params = {k: jax.device_put(v, NamedSharding(src, specs[k])) for k, v in host.items()}
    out, metrics = weight_sync.WeightSync(dst)(params)
    for k, v in host.items():
        assert np.array_equal(np.asarray(out[k]), v)
        assert out[k].sharding.spec == specs[k] and out[k].sharding.mesh == dst
        assert {d.id for d in out[k].devices()} <= {d.id for d in devs[:4]}
    assert metrics["async/sync_bytes"] == 8 * 12 * 4 + 12 * 4 + 16 * 8 * 2
    assert metrics["async/sync_s"] >= 0
    src2 = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 2}, devs[4:6])
    x = jax.device_put(np.zeros((6, 3), np.float32), NamedSharding(src2, P("tensor", None)))
    with pytest.raises(ValueError, match=r"\['x'\] of shape \(6, 3\) is split by .* cannot "
                                         r"split its dimension 6 evenly"):
        weight_sync.target_shardings({"x": x}, src)  # tensor 4 does not divide 6


def test_split_devices_per_process():
    class D:
        def __init__(self, i, p):
            self.id, self.process_index = i, p
    devs = [D(i, i // 4) for i in range(8)]
    trainer, sampler = async_rollouts.split_devices(4, devs)
    assert [d.id for d in sampler] == [0, 1, 4, 5] and [d.id for d in trainer] == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        async_rollouts.split_devices(3, devs)
    assert async_rollouts.sampler_device_count(0.25, 8) == 2
    assert async_rollouts.sampler_device_count(0.01, 8) == 1
    assert async_rollouts.sampler_device_count(3.0, 8) == 3
    groups = async_rollouts.replica_groups(sampler, 2)  # one replica on each process
    assert [[d.id for d in g] for g in groups] == [[0, 1], [4, 5]]
    assert [[d.id for d in g] for g in async_rollouts.replica_groups(sampler, 1)] == \
        [[0, 1, 4, 5]]  # one replica across both processes
    with pytest.raises(ValueError, match="sampler_mesh.replicas=3 is not a multiple of the 2 "
                                         "processes"):
        async_rollouts.replica_groups(sampler, 3)


def test_async_with_several_processes_needs_a_replica_per_process_and_a_schedule(monkeypatch):
    """meshes() on 2 x 4 devices: async needs replicas on each process (one mesh across them
    deadlocked) and train.rollout_version='scheduled' (the newest version a process has seen
    depends on its timing); both errors name the field. 2 x 4 with replicas 2 splits."""
    class D:  # jax.sharding.Mesh only reshapes the device objects
        def __init__(self, i):
            self.id, self.process_index = i, i // 4
    devs = [D(i) for i in range(8)]
    flags = {**SPLIT, "train.mode": "async", "mesh.tensor": 2, "mesh.fsdp": 2, "mesh.data": 1}
    with pytest.raises(ValueError, match=r"train.mode='async' with 2 processes needs sampler "
                                         r"replicas .* sampler_mesh.replicas=1 must be a "
                                         r"multiple of 2"):
        async_rollouts.meshes(_tiny(**flags), devs)
    with pytest.raises(ValueError, match="needs train.rollout_version='scheduled' \\(got "
                                         "'newest'\\)"):
        async_rollouts.meshes(_tiny(**flags, **{"sampler_mesh.replicas": 2}), devs)
    t_mesh, s_meshes = async_rollouts.meshes(_tiny(**flags, **{
        "sampler_mesh.replicas": 2, "train.rollout_version": "scheduled"}), devs)
    assert [d.id for d in t_mesh.devices.flat] == [2, 3, 6, 7]
    assert [[d.id for d in m.devices.flat] for m in s_meshes] == [[0, 1], [4, 5]]
    assert all(dict(m.shape) == {"data": 2, "fsdp": 1, "tensor": 1} for m in s_meshes)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert [r for r, _ in async_rollouts.own_replicas(s_meshes)] == [1]


@pytest.mark.parametrize("overrides,needle", [
    ({"train.mode": "pipelined"}, "train.mode='pipelined' is not valid; choose one of "
                                  "['sync', 'async']"),
    ({"train.mode": "async"}, "train.mode='async' needs sampler_mesh.devices > 0"),
    ({"train.mode": "async", "sampler_mesh.devices": 4.0, "train.max_staleness": -1},
     "train.max_staleness must be an int >= 0, got -1"),
    ({"train.mode": "async", "sampler_mesh.devices": 4.0, "train.sync_every": 3,
      "train.max_staleness": 1}, "train.max_staleness=1 is below train.sync_every=3 - 1"),
    ({"train.sync_every": 2}, "train.sync_every=2 applies to train.mode='async' only"),
    ({"sampler_mesh.devices": 2.5}, "sampler_mesh.devices=2.5 must be a device count"),
    ({"sampler_mesh.devices": -1.0}, "sampler_mesh.devices must be in [0, inf), got -1.0"),
    ({"sampler_mesh.tensor": 0}, "sampler_mesh sizes (data, fsdp, tensor) must be positive"),
    ({"train.mode": "async", "sampler_mesh.devices": 4.0, "loss.method": "ppo_clip_recompute"},
     "loss.method='ppo_clip_recompute' with train.mode='async' and train.max_staleness=1: its "
     "pi_old is recomputed"),
    ({"sampler_mesh.devices": 4.0, "rollout.mismatch.staleness": 2},
     "rollout.mismatch.staleness=2 is not supported with a split layout"),
    ({"sampler_mesh.devices": 4.0, "env.id": "trustrl:guess_number"},
     "env.id='trustrl:guess_number' is not supported with a split layout"),
    ({"train.rollout_version": "oldest"}, "train.rollout_version='oldest' is not valid; choose "
                                          "one of ['newest', 'scheduled']"),
    ({"train.rollout_version": "scheduled"}, "train.rollout_version='scheduled' applies to "
                                             "train.mode='async' only"),
    ({"sampler_mesh.replicas": 2}, "sampler_mesh.replicas=2 needs a split layout"),
    ({"sampler_mesh.devices": 4.0, "sampler_mesh.replicas": 0},
     "sampler_mesh.replicas must be an int >= 1, got 0"),
    ({"sampler_mesh.devices": 4.0, "sampler_mesh.replicas": 3}, "rollout.prompts_per_iter=4 is "
                                                                "not divisible by sampler_mesh."
                                                                "replicas=3"),
    ({"sampler_mesh.devices": 4.0, "sampler_mesh.replicas": 2, "rollout.dynamic_sampling": True},
     "rollout.dynamic_sampling=True is not supported with sampler_mesh.replicas=2"),
])
def test_bad_async_configs_name_the_field(overrides, needle):
    with pytest.raises(ValueError) as e:
        cv.validate(_tiny(**overrides))
    assert needle in str(e.value), str(e.value)


def test_a_recompute_method_is_fine_at_staleness_0():
    cv.validate(_tiny(**{"train.mode": "async", "sampler_mesh.devices": 4.0,
                         "train.max_staleness": 0, "loss.method": "ppo_clip_recompute"}))


@pytest.mark.parametrize("flags,needle", [
    (["--config.sampler_mesh.devices=8", "--config.train.mode=async"],
     "sampler_mesh.devices=8.0 gives the sampler 8 of 8 devices"),
    (["--config.sampler_mesh.devices=4", "--config.mesh.data=2"],  # data 2 x tensor 4 = 8 > 4
     "mesh does not fit the trainer's 4 devices"),
    (["--config.sampler_mesh.devices=4", "--config.mesh.data=1", "--config.sampler_mesh.data=8"],
     "sampler_mesh does not fit the sampler's 4 devices"),
])
def test_a_split_that_does_not_fit_the_devices_exits_2(tmp_path, subprocess_env, flags, needle):
    out = _main([TINY, f"--workdir={tmp_path / 'run'}", *flags], subprocess_env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert needle in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_two_processes_on_a_split_layout_equal_one_process(tmp_path, subprocess_env, mode):
    """2 processes x 4 devices == 1 x 8 on a split layout; the trainer takes 2 devices of each
    process (fsdp 2 across the processes x tensor 2), so the weight sync goes through the
    hosts. Sync: one sampler mesh on the other 2 of each process (data 4). Async: two sampler
    replicas (one per process, data 2), train.rollout_version='scheduled', max_staleness 1, a
    slow sampler (emulated 1 s) and a checkpoint every iteration while the sampler samples;
    the rows of both replicas are gathered by the trainer. Metrics to rtol = atol = 1e-5 as in
    tests/infra/test_multiprocess.py."""
    import io
    import subprocess
    import sys

    from trustrl.tools import local_cluster
    from test_multihost import REPO
    flags = ["--config=configs/default.py:tiny", "--config.mesh.data=1", "--config.mesh.fsdp=2",
             "--config.mesh.tensor=2", "--config.sampler_mesh.devices=4",
             "--config.eval.every=0", "--config.warmstart.steps=0", "--config.train.iterations=3",
             f"--config.train.mode={mode}"]
    if mode == "async":
        flags += ["--config.sampler_mesh.replicas=2", "--config.train.rollout_version=scheduled",
                  "--config.train.max_staleness=1", "--config.train.emulate_sample_s=1.0",
                  "--config.checkpoint.every=1"]
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "trustrl.main", f"--workdir={one}", *flags],
                          cwd=REPO, env=subprocess_env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two, out = tmp_path / "two", io.StringIO()
    code = local_cluster.run([sys.executable, "-m", "trustrl.main", f"--workdir={two}",
                              "--multihost", *flags], 2, 4, env=subprocess_env, timeout=600,
                             out=out)
    assert code == 0, out.getvalue()[-4000:]
    want, got = (read_jsonl(str(d / "metrics.jsonl")) for d in (one, two))
    if mode == "async":
        assert [r["async/version_lag"] for r in got] == [0.0, 1.0, 1.0]
    compared = 0
    for a, b in zip(want, got, strict=True):
        assert set(a) == set(b)
        for k, v in a.items():
            if k.startswith(("time/", "async/sync_s", "async/sampler_idle",
                             "async/trainer_wait", "async/queued")):  # wall times
                continue
            assert np.isclose(b[k], v, rtol=1e-5, atol=1e-5), (a["step"], k, v, b[k])
            compared += 1
    assert compared > 30 and want[-1]["async/sync_bytes"] > 0


@pytest.mark.slow
def test_kill_9_and_resume_in_async_mode(tmp_path, subprocess_env):
    """An async run (max_staleness 0, a checkpoint every iteration, a slow trainer) killed with
    SIGKILL once 2 iterations are logged, then rerun: it resumes from its last checkpoint,
    regenerates the rollouts that were in flight, and its metrics rows equal an uninterrupted
    run's (each step written once)."""
    import signal
    import subprocess
    import time

    from test_multihost import REPO, _cli
    flags = ["--config.mesh.data=1", "--config.sampler_mesh.devices=4",
             "--config.train.mode=async", "--config.train.max_staleness=0",
             "--config.train.iterations=5", "--config.eval.every=0",
             "--config.checkpoint.every=1", "--config.train.emulate_train_s=0.5"]
    ref = tmp_path / "ref"
    done = subprocess.run(_cli(ref, *flags), cwd=REPO, env=subprocess_env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    wd = tmp_path / "killed"
    p = subprocess.Popen(_cli(wd, *flags), cwd=REPO, env=subprocess_env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ((wd / "metrics.jsonl").exists()
               and len((wd / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert len((wd / "metrics.jsonl").read_text().splitlines()) < 5
    done = subprocess.run(_cli(wd, *flags), cwd=REPO, env=subprocess_env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    want, got = (read_jsonl(str(d / "metrics.jsonl")) for d in (ref, wd))
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert [_math(r) for r in got] == [_math(r) for r in want]


@pytest.mark.parametrize("replicas", [1, 2])
def test_partial_rollouts_keep_each_tokens_mu_and_version(tmp_path, monkeypatch, replicas):
    """train.partial_rollouts = 2 of 6 new tokens, max_staleness 2, the sampler slowed before
    each segment so that the trainer publishes while rows are generating: some rows span two
    versions. Every token's recorded mu equals the log-prob that the parameters of its
    recorded version give it (the trainer's score program on the whole row), and each row's
    versions never decrease along the row. With 2 sampler replicas (and scheduled versions)
    each switches on its own, the joined rollout keeps every token's version, and every
    rollout's first segment has the scheduled version max(0, j - 2)."""
    import time
    published, taken = {}, []
    publish, take = async_rollouts.RolloutProducer.publish, async_rollouts.RolloutProducer.take
    newest = async_rollouts.RolloutProducer._newest

    def recording_publish(self, version, state):
        out = publish(self, version, state)
        published[version] = self._trainer_params[version]
        return out

    def recording_take(self, it):
        out = take(self, it)
        taken.append((out[0], self.run))
        return out

    def slow_newest(self, replica):
        time.sleep(0.4)
        return newest(self, replica)

    monkeypatch.setattr(async_rollouts.RolloutProducer, "publish", recording_publish)
    monkeypatch.setattr(async_rollouts.RolloutProducer, "take", recording_take)
    monkeypatch.setattr(async_rollouts.RolloutProducer, "_newest", slow_newest)
    _, rows = _run(tmp_path, "partial", **{"train.mode": "async", "train.max_staleness": 2,
                                           "train.iterations": 6, "train.partial_rollouts": 2,
                                           "rollout.overlong_penalty": 0.0,
                                           "train.emulate_train_s": 0.6,
                                           "sampler_mesh.replicas": replicas,
                                           "train.rollout_version": ("newest", "scheduled")[
                                               replicas - 1]})
    assert sum(r["async/partial_rows"] for r in rows) >= 1, rows
    spans = 0
    for item, run in taken:
        v, host = item.token_versions, item.host
        assert ((v >= 0) == (host.response_mask > 0)).all()
        assert v[v >= 0].min() == item.version
        if replicas == 2:
            assert item.version == max(0, item.iteration - 2)
        for row in v:
            row = row[row >= 0]
            assert (np.diff(row) >= 0).all()
            spans += int(row.size and row.max() > row.min())
        batch = {k: jnp.asarray(x) for k, x in ts.rollout_batch(host, jnp.asarray(
            np.zeros(len(item.rewards), np.float32))).items() if x is not None}
        for version in np.unique(v[v >= 0]):
            with jax.set_mesh(run.mesh):
                mu = np.asarray(run.score(run.policy_params(published[int(version)]), batch))
            sel = v == version
            np.testing.assert_allclose(mu[sel], host.rollout_logp[sel], atol=2e-5)
    assert spans >= 1


ASYNC = {"train.mode": "async", "sampler_mesh.devices": 4.0}


@pytest.mark.parametrize("overrides,needle", [
    ({"train.partial_rollouts": 2}, "train.partial_rollouts=2 applies to train.mode='async' "
                                    "only"),
    ({**ASYNC, "train.partial_rollouts": 4}, "train.partial_rollouts=4 must be below rollout."
                                             "max_new_tokens=4"),
    ({**ASYNC, "train.partial_rollouts": 2, "rollout.dynamic_sampling": True},
     "train.partial_rollouts=2 is not supported with rollout.dynamic_sampling=True"),
    ({**ASYNC, "train.partial_rollouts": 2, "loss.method": "dppo_full_tv"},
     "not supported with loss.method='dppo_full_tv': the full-vocabulary methods"),
])
def test_bad_partial_rollout_configs_name_the_field(overrides, needle):
    with pytest.raises(ValueError) as e:
        cv.validate(_tiny(**overrides))
    assert needle in str(e.value), str(e.value)


def test_full_vocabulary_methods_train_on_the_rollouts_own_parameters(tmp_path, monkeypatch):
    """dppo_full_tv recomputes mu from the rollout's parameters: with stale rollouts the train
    step gets those of the rollout's version (kept per version on the trainer), not the
    newest; other methods keep only the newest copy."""
    seen = []
    take = async_rollouts.RolloutProducer.take

    def recording_take(self, it):
        item, params, metrics = take(self, it)
        seen.append((item.version, params is self._trainer_params[item.version],
                     len(self._trainer_params)))
        return item, params, metrics

    monkeypatch.setattr(async_rollouts.RolloutProducer, "take", recording_take)
    _run(tmp_path, "full", **{"train.mode": "async", "train.max_staleness": 1,
                              "train.iterations": 4, "train.emulate_train_s": 0.5,
                              "loss.method": "dppo_full_tv"})
    assert all(same for _, same, _ in seen) and max(n for *_, n in seen) >= 2, seen
