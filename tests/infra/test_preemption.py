"""SIGTERM stops a run at an iteration boundary with a checkpoint; the rerun resumes. And the
--multihost arguments."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from trustrl.infra import preemption
from trustrl.main import distributed_kwargs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_distributed_kwargs_from_flags_and_environment():
    assert distributed_kwargs(False, None, None, None) is None
    assert distributed_kwargs(True, None, None, None, environ={}) == {}  # auto-detect (TPU)
    assert distributed_kwargs(True, "10.0.0.1:1234", 2, 1, environ={}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    env = {"JAX_COORDINATOR_ADDRESS": "host:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed_kwargs(True, None, None, None, environ=env) == {
        "coordinator_address": "host:99", "num_processes": 4, "process_id": 3}
    # a flag wins over its environment variable
    assert distributed_kwargs(True, None, None, 0, environ=env)["process_id"] == 0


@pytest.mark.parametrize("args,env,needle", [
    ((False, "h:1", None, None), {}, "--coordinator_address only apply with --multihost"),
    ((True, None, 2, None), {}, "also needs --coordinator_address (or JAX_COORDINATOR_ADDRESS), "
                                "--process_id (or JAX_PROCESS_ID)"),
    ((True, "h:1", 2, 2), {}, "--process_id=2 must be in [0, --num_processes=2)"),
    ((True, "nohostport", 2, 0), {}, "must be host:port"),
    ((True, None, None, None), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an int"),
])
def test_distributed_kwargs_errors(args, env, needle):
    with pytest.raises(ValueError) as e:
        distributed_kwargs(*args, environ=env)
    assert needle in str(e.value)


def test_multihost_flag_errors_exit_2_before_jax(subprocess_env):
    out = subprocess.run([sys.executable, "-m", "trustrl.main", "--config=configs/default.py:tiny",
                          "--workdir=/nonexistent/x", "--multihost", "--num_processes=2"],
                         cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "also needs --coordinator_address" in out.stderr


def test_watcher_flags_a_signal_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.Watcher() as w:
        assert not w.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert w.should_stop(1) and w.received == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def _start(wd, env):
    return subprocess.Popen(
        [sys.executable, "-m", "trustrl.main", "--config=configs/default.py:tiny", f"--workdir={wd}",
         "--config.train.iterations=40", "--config.checkpoint.every=0", "--config.eval.every=0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(wd):
    path = wd / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _term_after_rows(proc, wd, n, timeout=300, sig=signal.SIGTERM):
    deadline = time.time() + timeout
    while len(_rows(wd)) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run wrote no metrics in time"
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_sigterm_checkpoints_at_an_iteration_boundary_and_the_rerun_resumes(tmp_path,
                                                                            subprocess_env):
    from trustrl.training import resume
    wd = tmp_path / "run"
    code, out, err = _term_after_rows(_start(wd, subprocess_env), wd, 1)
    assert code == preemption.EXIT_CODE, err[-3000:]
    stopped = resume.latest_checkpoint(str(wd))  # checkpoint.every=0: only the preemption saves
    assert stopped is not None and 1 <= stopped < 40
    assert f"preempted (SIGTERM): checkpoint saved at iteration {stopped}" in err
    assert "Traceback" not in err
    assert [r["step"] for r in _rows(wd)] == list(range(1, stopped + 1))  # no torn row
    # the same command resumes where it stopped (and can be preempted again)
    code, out, err = _term_after_rows(_start(wd, subprocess_env), wd, stopped + 1)
    assert f"at iteration {stopped}" in out, out[-3000:]
    assert code == preemption.EXIT_CODE, err[-3000:]
    again = resume.latest_checkpoint(str(wd))
    assert again > stopped
    assert [r["step"] for r in _rows(wd)] == list(range(1, again + 1))


@pytest.mark.slow
def test_sigint_is_handled_as_sigterm(tmp_path, subprocess_env):
    """Ctrl-C: the iteration in flight finishes and is checkpointed (nothing since the last
    periodic checkpoint is lost); exit status 130."""
    from trustrl.training import resume
    wd = tmp_path / "run"
    code, out, err = _term_after_rows(_start(wd, subprocess_env), wd, 2, sig=signal.SIGINT)
    stopped = resume.latest_checkpoint(str(wd))  # checkpoint.every=0: only the interrupt saves
    assert code == 130, err[-3000:]
    assert stopped is not None and 2 <= stopped < 40
    assert f"preempted (SIGINT): checkpoint saved at iteration {stopped}" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [r["step"] for r in _rows(wd)] == list(range(1, stopped + 1))
