"""Reliability classes: one run per workdir (locks and leases), the recorded config changes only
once a run has started, the processes of a run agree or stop, and late failures are early,
one-line errors. (Integrity records of written files: tests/infra/test_integrity.py.)"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from trustrl.training import config_validation as cv, resume
from trustrl.infra import multihost, storage, workdir_lock
from trustrl.tools import local_cluster

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD = ("import sys, time\n"
        "from trustrl import workdir_lock\n"
        "with workdir_lock.hold(sys.argv[1]):\n"
        "    print('holding', flush=True)\n"
        "    time.sleep(float(sys.argv[2]))\n")


def _holder(wd, seconds, env=None):
    """A process holding wd's lock (printed 'holding' once it has it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(wd), str(seconds)], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding", p.stderr.read()
    return p


def _cli(wd, *extra):
    return [sys.executable, "-m", "trustrl.main", "--config=configs/default.py:tiny",
            f"--workdir={wd}", "--config.log.progress=False", *extra]


# -- one run per workdir ------------------------------------------------------------------------

def test_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    wd = tmp_path / "wd"
    p = _holder(wd, 60)
    try:
        with pytest.raises(workdir_lock.WorkdirLocked) as e:
            with workdir_lock.hold(str(wd)):
                pass
        assert f"pid {p.pid} on host {socket.gethostname()}" in str(e.value)
        assert "trustrl.lock" in str(e.value) and "another --workdir" in str(e.value)
    finally:
        p.kill()
        p.wait()
    with workdir_lock.hold(str(wd)) as lock:  # the kernel released the killed holder's lock
        assert lock.previous["pid"] == p.pid  # and its left-over owner record is reported
        with workdir_lock.hold(str(wd)) as again:  # re-entrant within a process
            assert again is lock
    with workdir_lock.hold(str(wd)) as lock:  # released cleanly: nothing to report
        assert lock.previous is None


def test_the_cli_refuses_a_held_workdir_within_seconds(tmp_path, subprocess_env):
    wd = tmp_path / "wd"
    p = _holder(wd, 120, subprocess_env)
    try:
        start = time.monotonic()
        out = subprocess.run(_cli(wd), cwd=REPO, env=subprocess_env, capture_output=True,
                             text=True, timeout=300)
        took = time.monotonic() - start
    finally:
        p.kill()
        p.wait()
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[-1].startswith(f"error: workdir {wd} is in use by another run (pid {p.pid}")
    assert took < 60
    assert sorted(os.listdir(wd)) == ["trustrl.lock"]  # nothing written: no config, no data


def test_a_gcs_lease_names_its_holder_goes_stale_and_is_released(gcs_server):
    wd = f"gs://trustrl-test/{uuid.uuid4().hex[:12]}"
    path = storage.join(wd, workdir_lock.LOCK_FILE)
    live = {"owner": "other", "host": "tpu-host-7", "pid": 4242, "started_utc": "then",
            "renewed": time.time()}
    storage.write(path, json.dumps(live))
    with pytest.raises(workdir_lock.WorkdirLocked) as e:
        with workdir_lock.hold(wd, ttl=60):
            pass
    assert "pid 4242 on host tpu-host-7" in str(e.value) and "stale after 60 s" in str(e.value)
    storage.write(path, json.dumps({**live, "renewed": time.time() - 61}))  # its run died
    notices = []
    with workdir_lock.hold(wd, ttl=60, announce=notices.append) as lease:
        assert "pid 4242 on host tpu-host-7" in notices[0]
        assert json.loads(storage.read_text(path))["owner"] == lease.token
    assert not storage.exists(path)  # released: deleted


def test_a_lost_gcs_lease_stops_the_run(gcs_server):
    wd = f"gs://trustrl-test/{uuid.uuid4().hex[:12]}"
    with workdir_lock.hold(wd, ttl=0.4) as lease:
        workdir_lock.check(wd)  # ours: fine
        storage.write(storage.join(wd, workdir_lock.LOCK_FILE), json.dumps(
            {"owner": "thief", "host": "h2", "pid": 7, "started_utc": "now",
             "renewed": time.time()}))
        deadline = time.monotonic() + 20
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(workdir_lock.WorkdirLocked,
                           match="lost the lease .* to another run .pid 7 on host h2"):
            workdir_lock.check(wd)


# -- the recorded config ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run of 2 iterations (checkpoints at 1 and 2), made once, copied by each test."""
    wd = tmp_path_factory.mktemp("finished") / "wd"
    out = subprocess.run(_cli(wd, "--config.train.iterations=2", "--config.eval.every=0",
                              "--config.checkpoint.every=1"),
                         cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return wd


def _copy(run, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(run, wd)
    return wd


@pytest.mark.slow
def test_a_failed_allow_config_change_leaves_the_config_and_the_original_command_works(
        finished_run, tmp_path, subprocess_env):
    wd = _copy(finished_run, tmp_path)
    before = (wd / "config.json").read_bytes()
    # a changed architecture is accepted by the flag but cannot restore the checkpoint
    out = subprocess.run(_cli(wd, "--config.train.iterations=3", "--config.eval.every=0",
                              "--config.model.hidden_size=48", "--allow_config_change"),
                         cwd=REPO, env=subprocess_env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: no intact checkpoint")
    assert (wd / "config.json").read_bytes() == before  # provenance unchanged
    assert not (wd / resume.CHANGES_FILE).exists()
    out = subprocess.run(_cli(wd, "--config.train.iterations=3", "--config.eval.every=0"),
                         cwd=REPO, env=subprocess_env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout


def test_a_deleted_config_is_checked_against_the_checkpoint_copy(finished_run, tmp_path):
    wd = _copy(finished_run, tmp_path)
    recorded = json.loads((wd / "config.json").read_text())
    (wd / "config.json").unlink()
    import ml_collections
    cfg = ml_collections.ConfigDict(recorded)
    notices, changes, step = resume.check_resume(cfg, str(wd))  # the same config resumes
    assert step == 2 and changes == []
    assert any("is missing; checking the config against the copy in checkpoint 2" in n
               for n in notices)
    cfg.loss.method = "grpo"  # another method is refused, as with config.json
    with pytest.raises(ValueError, match="loss.method: 'dppo_binary_tv' -> 'grpo'"):
        resume.check_resume(cfg, str(wd))
    # neither config.json nor a copy in the checkpoint (an older run): refused unless allowed
    host = wd / "checkpoints" / "2" / "host" / "metadata"
    data = json.loads(host.read_text())
    del data["config"]
    host.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="nothing says which config the run used"):
        resume.check_resume(cfg, str(wd))
    notices, _, _ = resume.check_resume(cfg, str(wd), allow_changes=True)
    assert "no recorded config" in notices[0]


def test_an_edited_config_is_refused_naming_the_file(finished_run, tmp_path, subprocess_env):
    wd = _copy(finished_run, tmp_path)
    path = wd / "config.json"
    path.write_text(path.read_text().replace('"dppo_binary_tv"', '"dppo_binary_kl"'))
    out = subprocess.run(_cli(wd, "--config.train.iterations=2", "--config.eval.every=0",
                              "--config.loss.method=dppo_binary_kl"),
                         cwd=REPO, env=subprocess_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"invalid config: {path} (the config of the run being resumed) "
                           f"changed since it was written")
    assert "checkpoint 2 holds the run's config" in line
    # a truncated one too (another member of the class)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="bytes, .* when written"):
        resume.check_resume(cv_cfg(wd), str(wd))


def cv_cfg(wd):
    import ml_collections
    return ml_collections.ConfigDict(json.loads(
        (wd / "checkpoints" / "2" / "host" / "metadata").read_text())["config"])


# -- processes agree or stop --------------------------------------------------------------------

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


# -- late failures become early one-line errors -------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--config.loss.method=dppo_topk_tv", "--config.rollout.record_topk=1000"],
     "rollout.record_topk=1000 is larger than the vocabulary (tokenizer.vocab_size = 264)"),
    (["--config.rollout.top_k=1000"], "rollout.top_k=1000 is larger than the vocabulary"),
    (["--config.tokenizer.vocab_size=100"], "tokenizer.vocab_size=100 is below the trained "
                                            "BPE's 256 byte symbols + 3 special tokens = 259"),
    (["--config.model.num_heads=3", "--config.model.num_kv_heads=2"],
     "model.num_heads=3 must be a multiple of model.num_kv_heads=2"),
    (["--config.task.operations=+?"], "task.operations='+?': arithmetic operations='+?' must "
                                      "be a non-empty string of"),
    (["--config.task.difficulty=40"], "arithmetic difficulty (digits per operand) must be in "
                                      "[1, 12], got 40"),
    (["--config.task.seed=4294967296"], "task.seed must be an int in [0, 4294967295]"),
    (["--config.mesh.data=-1", "--config.rollout.max_rows=3"],
     "rollout.max_rows=3 is not divisible by the mesh's batch axes (data x fsdp = 2"),
    (["--config.rollout.temperature=1e-30"],
     "rollout.temperature=1e-30 is below 0.001: logits / T then overflow"),
])
def test_values_known_before_any_build_fail_before_writing(tmp_path, subprocess_env, args,
                                                           needle):
    wd = tmp_path / "wd"
    out = subprocess.run(_cli(wd, *args), cwd=REPO, env=subprocess_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert needle in out.stderr and out.stderr.startswith("invalid config: ")
    assert not wd.exists()


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path, subprocess_env):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "trustrl.main", f"--config={bad}",
                          f"--workdir={tmp_path / 'wd'}"], cwd=REPO, env=subprocess_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith(f"invalid config: --config={bad}: SyntaxError: ")
    assert not (tmp_path / "wd").exists()


def test_a_hf_dir_is_checked_from_its_config_json(tmp_path):
    import ml_collections
    from configs import default
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    cfg = default.get_config("tiny")
    cfg.model.hf_dir = str(d)
    cfg.warmstart.steps = 0
    for hf_cfg, needle in [
            ({"num_attention_heads": 9, "num_key_value_heads": 2, "hidden_size": 72,
              "vocab_size": 500}, "num_heads=9 must be a multiple of"),
            ({"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
              "vocab_size": 10}, "rollout.top_k=20 is larger than the vocabulary (vocab_size "
                                 "of")]:
        (d / "config.json").write_text(json.dumps(hf_cfg))
        cfg.rollout.top_k = 20
        with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
            cv.check_environment(cfg, str(tmp_path / "wd"))
    assert isinstance(cfg, ml_collections.ConfigDict)


def test_a_tokenizer_path_is_checked_against_the_sampling_fields(tmp_path):
    from configs import default
    from trustrl.data.tokenizer import train_bpe
    d = tmp_path / "tok"
    train_bpe(["1 + 2 = 3", "4 + 5 = 9"] * 20, 262, save_dir=str(d))
    cfg = default.get_config("tiny")
    cfg.tokenizer.path = str(d)
    cfg.rollout.top_k = 263
    with pytest.raises(ValueError, match=r"rollout.top_k=263 is larger than the vocabulary \(the "
                                         r"vocabulary of .*tokenizer.json = 262\)"):
        cv.check_environment(cfg, str(tmp_path / "wd"))
    cfg.rollout.top_k = 262
    cv.check_environment(cfg, str(tmp_path / "wd"))  # at the vocabulary's size: fine
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.path: cannot load .*tokenizer.json"):
        cv.check_environment(cfg, str(tmp_path / "wd"))


def test_storage_errors_name_the_path_instead_of_raw_os_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(storage.StorageError, match=f"cannot append to {blocker}/m.jsonl"):
        storage.append(str(blocker / "m.jsonl"), b"row\n")
    with pytest.raises(storage.StorageError, match="cannot create the directory"):
        storage.write(str(blocker / "sub" / "f.json"), "{}")
    with pytest.raises(storage.StorageError, match="cannot create the directory"):
        storage.makedirs(str(blocker / "d"))


def _mount_tmpfs(path):
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux")
def test_a_checkpoint_directory_turning_read_only_ends_the_run_in_seconds(tmp_path,
                                                                          subprocess_env):
    wd = tmp_path / "wd"
    ckpt = wd / "checkpoints"
    _mount_tmpfs(ckpt)
    try:
        p = subprocess.Popen(_cli(wd, "--config.train.iterations=100", "--config.eval.every=0",
                                  "--config.checkpoint.every=1"), cwd=REPO, env=subprocess_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not ((wd / "metrics.jsonl").exists()
                   and len((wd / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        # a remount fails (busy) while a checkpoint file is open for writing: retry until it
        # lands between two saves
        until = time.monotonic() + 60
        while (r := subprocess.run(["mount", "-o", "remount,ro", str(ckpt)],
                                   capture_output=True, text=True)).returncode:
            assert p.poll() is None and time.monotonic() < until, r.stderr
            time.sleep(0.05)
        start = time.monotonic()
        out, err = p.communicate(timeout=200)
        took = time.monotonic() - start
    finally:
        subprocess.run(["umount", "-l", str(ckpt)])
    last = err.strip().splitlines()[-1]
    assert p.returncode == 1 and took < 30, err[-3000:]
    assert last.startswith("error: cannot save checkpoint") and "Read-only file system" in last
    assert err.count("Traceback") == 0
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # nothing torn
