"""The processes of a run agree or stop: a disagreeing, missing, failed or killed process is
named by the others, in one line, early. (Integrity records of written files:
tests/infra/test_integrity.py.)"""
import os
import socket
import subprocess
import sys
import time

import pytest

from trustrl.infra import multihost
from trustrl.tools import local_cluster


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(wd, *extra):
    return [sys.executable, "-m", "trustrl.main", "--config=configs/default.py:tiny",
            f"--workdir={wd}", "--config.log.progress=False", *extra]


def _spawn(i, n, port, argv, env, devices=4):
    return subprocess.Popen(argv, cwd=REPO, env=local_cluster.process_env(i, n, devices, port, env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout):
    start, outs = time.monotonic(), []
    for p in procs:
        outs.append(p.communicate(timeout=max(1, timeout - (time.monotonic() - start)))[0])
    return [p.returncode for p in procs], outs, time.monotonic() - start


MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=4",
        "--config.eval.every=0", "--config.warmstart.steps=0", "--multihost"]


@pytest.mark.parametrize("extra1,needle", [
    (["--config.train.iterations=3"], "process 1 has config.train.iterations=3 where process 0 "
                                      "has 2"),
    (["--config.loss.method=ppo_clip"], 'process 1 has config.loss.method="ppo_clip" where '
                                        'process 0 has "dppo_binary_tv"'),
])
def test_processes_with_different_configs_all_stop_naming_the_field(tmp_path, subprocess_env,
                                                                     extra1, needle):
    port = local_cluster.free_port()
    wd = tmp_path / "wd"
    base = _cli(wd, "--config.train.iterations=2", *MESH)
    procs = [_spawn(0, 2, port, base, subprocess_env), _spawn(1, 2, port, base + extra1,
                                                              subprocess_env)]
    codes, outs, took = _finish(procs, 240)
    for out in outs:
        assert needle in out.strip().splitlines()[-1], out[-2000:]
        assert "Traceback" not in out
    assert codes == [2, 2] and took < 120
    assert not wd.exists()  # nothing written


def test_a_coordinator_port_in_use_fails_at_once_naming_the_address(tmp_path, subprocess_env):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        p0 = _spawn(0, 2, port, _cli(tmp_path / "wd", *MESH), subprocess_env)
        codes, outs, took = _finish([p0], 120)
    assert codes == [2] and took < 60, outs[0][-2000:]
    assert f"the coordinator address localhost:{port} is in use" in outs[0].strip().splitlines()[-1]


def test_a_process_without_its_coordinator_stops_within_the_timeout(tmp_path, subprocess_env):
    port = local_cluster.free_port()  # nobody serves it
    p1 = _spawn(1, 2, port, _cli(tmp_path / "wd", *MESH, "--coordinator_timeout=3"),
                subprocess_env)
    codes, outs, took = _finish([p1], 120)
    last = outs[0].strip().splitlines()[-1]
    assert codes == [2] and took < 60, outs[0][-2000:]
    assert last.startswith(f"error: the processes of this run did not all join the coordinator "
                           f"at localhost:{port} within 3 s (--coordinator_timeout)")


def test_a_process_that_fails_before_joining_is_waited_for_at_most_the_timeout(
        tmp_path, subprocess_env):
    port = local_cluster.free_port()
    base = _cli(tmp_path / "wd", *MESH, "--coordinator_timeout=5")
    procs = [_spawn(0, 2, port, base, subprocess_env),
             _spawn(1, 2, port, base + ["--config.loss.method=nope"], subprocess_env)]
    codes, outs, took = _finish(procs, 120)
    assert codes == [2, 2] and took < 60, outs
    assert outs[1].strip().splitlines()[-1].startswith("invalid config: loss.method='nope'")
    assert outs[0].strip().splitlines()[-1].startswith(
        "error: the processes of this run did not all join the coordinator")


class _FakeClient:
    """The coordination service's key-value store, in memory."""

    def __init__(self):
        self.kv = {}

    def key_value_set(self, k, v, allow_overwrite=False):
        assert allow_overwrite or k not in self.kv
        self.kv[k] = v

    def key_value_try_get(self, k):
        if k not in self.kv:
            raise RuntimeError("NOT_FOUND")
        return self.kv[k]

    def blocking_key_value_get(self, k, timeout_ms):
        if k not in self.kv:
            time.sleep(timeout_ms / 1000)
            raise RuntimeError("DEADLINE_EXCEEDED: timed out")
        return self.kv[k]


@pytest.fixture
def two_processes(monkeypatch):
    client = _FakeClient()
    monkeypatch.setattr(multihost, "_client", lambda: client)
    monkeypatch.setattr(multihost.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost.jax, "process_index", lambda: 0)
    monkeypatch.setattr(multihost, "_address", lambda: "coordinator localhost:1")
    return client


def test_peer_watch_names_a_failed_and_a_silent_process(two_processes, capsys):
    exits = []
    with multihost.PeerWatch(timeout=0.5, period=0.05, exit=exits.append):
        two_processes.kv["trustrl/failed/1"] = "error: cannot save checkpoint 3 to /x: full"
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    assert exits == [1]
    assert ("error: process 1 of 2 failed: error: cannot save checkpoint 3 to /x: full; "
            "stopping this process (0) too") in capsys.readouterr().err
    del two_processes.kv["trustrl/failed/1"]
    with multihost.PeerWatch(timeout=0.5, period=0.05, exit=exits.append):  # 1 never beats
        deadline = time.monotonic() + 10
        while len(exits) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert exits == [1, 1]
    assert "process 1 of 2 stopped responding (no heartbeat for" in capsys.readouterr().err


def test_exchange_names_a_process_that_does_not_arrive_or_failed(two_processes):
    with pytest.raises(multihost.PeerError, match="process 1 of 2 did not reach 'x' within 1 s"):
        multihost.exchange("x", "v", timeout_s=1)
    two_processes.kv["trustrl/failed/1"] = "invalid config: bad"
    with pytest.raises(multihost.PeerError, match="process 1 of 2 failed: invalid config: bad"):
        multihost.exchange("y", "v", timeout_s=30)


@pytest.mark.slow
def test_a_killed_process_is_named_by_the_survivor(tmp_path, subprocess_env):
    port = local_cluster.free_port()
    wd = tmp_path / "wd"
    env = {**subprocess_env, "TRUSTRL_PEER_TIMEOUT_S": "10"}
    argv = _cli(wd, "--config.train.iterations=200", "--config.checkpoint.every=0", *MESH)
    procs = [_spawn(0, 2, port, argv, env), _spawn(1, 2, port, argv, env)]
    deadline = time.monotonic() + 400
    while not (wd / "metrics.jsonl").exists():  # both are in the loop
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].kill()
    codes, outs, took = _finish(procs[:1], 120)
    procs[1].wait()
    last = outs[0].strip().splitlines()[-1]
    assert codes == [1] and took < 60, outs[0][-3000:]
    # the survivor's collective fails first (Gloo: connection reset); it names the lost peer
    assert last.startswith("error: process 1 of 2 stopped responding (no heartbeat for"), last
    assert "Traceback" not in outs[0]
