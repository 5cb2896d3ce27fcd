"""Two jax.distributed processes x 4 CPU devices run the tiny config as 1 process x 8 does.

The mesh (data=1, fsdp=2, tensor=4) puts the fsdp axis across the two processes, so both the
parameters and the batch rows are split between them: every host read gathers, every host
value is placed shard by shard, and Orbax saves / restores a checkpoint written by two
processes. Tolerance: the metrics agree to rtol = atol = 1e-5 (the reductions over the devices
run in another order; the measured differences were <= 5e-4 relative on the pi - mu mismatch
of ~1e-6, i.e. ~1e-9 absolute, and ~1e-7 relative elsewhere), rewards and counts exactly; the
final train state (parameters and Adam moments) to 1e-6 absolute (measured 1.7e-8).
"""
import io
import json
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from trustrl.tools import local_cluster

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=4",
        "--config.eval.every=0", "--config.warmstart.steps=0"]  # (fewer programs to compile)


def _cli(wd, *extra):
    return [sys.executable, "-m", "trustrl.main", "--config=configs/default.py:tiny",
            f"--workdir={wd}", *MESH, *extra]


def _rows(wd):
    return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]


def _state(step_dir):
    import orbax.checkpoint as ocp
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(step_dir)
    meta = getattr(meta, "item_metadata", meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ckptr.restore(step_dir, args=ocp.args.PyTreeRestore(restore_args=args))


def test_local_cluster_environment():
    env = local_cluster.process_env(1, 2, 4, 1234, {"XLA_FLAGS": "--a --xla_force_host_platform"
                                                    "_device_count=8 --b"})
    assert env["JAX_PROCESS_ID"] == "1" and env["JAX_NUM_PROCESSES"] == "2"
    assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:1234"
    assert env["XLA_FLAGS"].split() == ["--a", "--b", "--xla_force_host_platform_device_count=4"]


def test_local_cluster_kills_the_others_when_one_fails():
    code = ("import os, time, sys\n"
            "print('up', flush=True)\n"
            "sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(600)")
    out = io.StringIO()
    assert local_cluster.run([sys.executable, "-c", code], 2, 1, out=out) == 3
    assert "local_cluster: process 1 exited with status 3; killing the others" in out.getvalue()
    assert "[p0] up" in out.getvalue() and "[p1] up" in out.getvalue()


def _two_processes_with_a_resume(wd, env):
    """Iteration 1 on two processes, then a rerun that resumes it and runs iteration 2."""
    logs = []
    for extra in (["--config.train.iterations=1"], []):
        out = io.StringIO()
        code = local_cluster.run(_cli(wd, "--multihost", *extra), 2, 4, env=env, timeout=600,
                                 out=out)
        logs.append(out.getvalue())
        assert code == 0, out.getvalue()[-4000:]
    assert "[p0] resumed from" in logs[1] and "[p1] resumed from" in logs[1]
    assert "[p0] metrics:" in logs[1] and "[p1] metrics:" not in logs[1]  # one summary


def _assert_rows_match(want, got):
    assert [r["step"] for r in want] == [r["step"] for r in got] == [1, 2]  # written once
    compared = 0
    for a, b in zip(want, got):
        assert set(a) == set(b)
        for k, v in a.items():
            if k.startswith("time/"):
                continue
            if isinstance(v, float):
                assert np.isclose(b[k], v, rtol=1e-5, atol=1e-5), (a["step"], k, v, b[k])
            else:
                assert b[k] == v, (a["step"], k)
            compared += 1
    assert compared > 30
    assert any(k.startswith("rollout/mismatch") for k in got[1])


def _assert_states_match(s_ref, s_mp):
    leaves_ref, leaves_mp = jax.tree.leaves(s_ref), jax.tree.leaves(s_mp)
    assert len(leaves_ref) == len(leaves_mp) > 10
    for x, y in zip(leaves_ref, leaves_mp):
        np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(x, np.float64),
                                   rtol=0, atol=1e-6)
    assert int(s_mp["step"]) == int(s_ref["step"]) == 4


@pytest.mark.slow
def test_two_processes_equal_one_process_including_a_resume(tmp_path, subprocess_env,
                                                            gcs_server):
    """Also with a gs:// workdir (the local GCS emulator): Orbax's multi-process save /
    restore, the metrics and the tokenizer in the bucket, the dataset on the local disk."""
    ref = tmp_path / "one"
    done = subprocess.run(_cli(ref), cwd=REPO, env=subprocess_env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    want, s_ref = _rows(ref), _state(ref / "checkpoints" / "2" / "state")

    mp = tmp_path / "two"
    _two_processes_with_a_resume(mp, subprocess_env)
    _assert_rows_match(want, _rows(mp))
    _assert_states_match(s_ref, _state(mp / "checkpoints" / "2" / "state"))

    import uuid

    from trustrl.infra import storage
    wd = f"gs://trustrl-test/{uuid.uuid4().hex[:12]}/two"
    _two_processes_with_a_resume(wd, {**subprocess_env, **gcs_server,
                                      "TRUSTRL_CACHE": str(tmp_path / "cache")})
    _assert_rows_match(want, [json.loads(line) for line in
                              storage.read_text(f"{wd}/metrics.jsonl").splitlines()])
    assert {"config.json", "tokenizer/tokenizer.json"} <= set(storage.files(wd))
    assert not any(k.startswith("data/") for k in storage.files(wd))
    _assert_states_match(s_ref, _state(f"{wd}/checkpoints/2/state"))
