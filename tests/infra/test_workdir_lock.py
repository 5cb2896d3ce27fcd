"""One run per workdir (trustrl.infra.workdir_lock): locks and GCS leases: held, stale, lost."""
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from trustrl.infra import storage, workdir_lock

from test_multihost import REPO, _cli  # `python -m trustrl.main` on the tiny config


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
