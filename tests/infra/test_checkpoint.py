"""Durable checkpoints: each corruption is produced for real on a saved state, then the recovery
or the clear error is asserted (manifests, damaged steps, full disk, a read-only directory).

Tests run as root, where chmod does not stop writes: a read-only filesystem is simulated by
making os.fsync fail with EROFS, a full disk by monkeypatching shutil.disk_usage / os.write.
"""
import errno
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.infra import checkpoint as ckpt_lib
from trustrl.infra import storage

from test_multihost import REPO, _cli  # `python -m trustrl.main` on the tiny config


def _state(offset):
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    return {"w": jnp.asarray(w + offset), "step": jnp.asarray(offset, jnp.int32)}


def _two_steps(workdir):
    c = ckpt_lib.Checkpointer(str(workdir))
    c.save(1, _state(1), {"iteration": 1, "data": [1, 2]})
    c.save(2, _state(2), {"iteration": 2, "data": [3, 4]})
    c.close()
    return ckpt_lib.Checkpointer(str(workdir))


def _array_file(step_dir):
    """The largest file of the array data (OCDBT), where a flipped byte is a flipped value."""
    return max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)


def _corrupt(step_dir, how):
    if how == "host_json":
        path = os.path.join(step_dir, "host", "metadata")
        with open(path, "r+") as f:  # same size, no longer JSON
            text = f.read()
            f.seek(0)
            f.write("{" * len(text))
        return path
    path = _array_file(step_dir)
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "flip":
        blob = bytearray(open(path, "rb").read())
        blob[len(blob) // 2] ^= 0x40
        open(path, "wb").write(bytes(blob))
    elif how == "delete":
        os.remove(path)
    return path


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    c = _two_steps(tmp_path)
    step_dir = c.step_dir(2)
    with open(os.path.join(step_dir, ckpt_lib.MANIFEST)) as f:
        files = json.load(f)["files"]
    on_disk = sorted(os.path.relpath(p, step_dir)
                     for p in glob.glob(f"{step_dir}/**", recursive=True)
                     if os.path.isfile(p) and not p.endswith(ckpt_lib.MANIFEST))
    assert sorted(files) == on_disk and "host/metadata" in files
    rel = os.path.relpath(_array_file(step_dir), step_dir)
    assert files[rel]["size"] == os.path.getsize(_array_file(step_dir))
    assert files[rel]["sha256"] == ckpt_lib._sha256(_array_file(step_dir))
    assert ckpt_lib.verify_manifest(step_dir) is True
    c.close()


@pytest.mark.parametrize("how,why", [
    ("truncate", r"has \d+ bytes, \d+ when saved"), ("flip", "sha256 mismatch"),
    ("delete", "is missing"), ("host_json", "sha256 mismatch")])
def test_damaged_latest_step_falls_back_to_previous(tmp_path, capsys, how, why):
    c = _two_steps(tmp_path)
    path = _corrupt(c.step_dir(2), how)
    state, host = c.restore(_state(0))
    out = capsys.readouterr().out
    assert f"step 2 in {c.directory} cannot be restored: {path}" in out
    assert re.search(why, out), out
    assert "fell back to step 1" in out
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(1)["w"]))
    assert host == {"iteration": 1, "data": [1, 2]}
    # the damaged step is kept for inspection, out of the way of the replayed save of step 2
    assert os.path.isdir(os.path.join(c.damaged_directory, "2")) and c.latest_step() == 1
    c.save(2, _state(5), {"iteration": 2, "data": [9]})
    state, host = c.restore(_state(0))
    assert host["data"] == [9] and int(state["step"]) == 5
    c.close()


def test_orbax_alone_restores_a_flipped_byte_silently(tmp_path, capsys):
    """Why the manifest exists: without it, the same flip restores a wrong value."""
    c = _two_steps(tmp_path)
    _corrupt(c.step_dir(2), "flip")
    os.remove(os.path.join(c.step_dir(2), ckpt_lib.MANIFEST))
    state, host = c.restore(_state(0))
    assert "step 2 has no trustrl_manifest.json; restoring it unverified" in capsys.readouterr().out
    assert host["iteration"] == 2
    assert (np.asarray(state["w"]) != np.asarray(_state(2)["w"])).sum() >= 1
    c.close()


def test_unverified_step_with_broken_json_reports_the_real_cause(tmp_path, capsys):
    c = _two_steps(tmp_path)
    _corrupt(c.step_dir(2), "host_json")
    os.remove(os.path.join(c.step_dir(2), ckpt_lib.MANIFEST))
    _, host = c.restore(_state(0))
    out = capsys.readouterr().out
    assert "step 2 in" in out and "JSONDecodeError" in out and "Event loop" not in out
    assert host["iteration"] == 1
    c.close()


def test_a_long_tensorstore_error_keeps_its_reason():
    """CI once cut an escaped 600-character path before ': Read-only file system'."""
    path = "".join(f"\\x{b:02x}" for b in b"d" * 200)
    inner = ValueError(f'FAILED_PRECONDITION: Error writing local file "{path}": Read-only file '
                       "system [OS error 30: Read-only file system] [source locations='a.cc:1'] "
                       "[tensorstore_spec='{\"driver\": \"zarr\"}']")
    try:
        raise RuntimeError("save failed") from inner
    except RuntimeError as e:
        cause = ckpt_lib._cause(e)
    assert cause.startswith("ValueError: FAILED_PRECONDITION: Error writing local file")
    assert cause.endswith("Read-only file system [OS error 30: Read-only file system]")
    assert " ... " in cause and len(cause) < 700
    assert "source locations" not in cause and "tensorstore_spec" not in cause


def test_no_intact_step_is_a_clear_error_and_moves_nothing(tmp_path):
    c = _two_steps(tmp_path)
    _corrupt(c.step_dir(2), "flip")
    _corrupt(c.step_dir(1), "truncate")
    with pytest.raises(ckpt_lib.CheckpointError, match=rf"no intact checkpoint in {c.directory}: "
                       r"step 2: .*\(sha256 mismatch\); step 1: .*when saved"):
        c.restore(_state(0))
    assert sorted(os.listdir(c.directory)) == ["1", "2"]
    assert not os.path.exists(c.damaged_directory)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step 1: .*when saved"):
        c.restore(_state(0), step=1)  # an explicit step does not fall back


def test_save_on_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    c = _two_steps(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 0, 100))
    with pytest.raises(storage.StorageError, match=rf"not enough free space for checkpoint 3 in "
                       rf"{c.directory}: 0.0 MiB free"):
        c.save(3, _state(3), {"iteration": 3})
    assert c.manager.all_steps() == [1, 2] and not os.path.exists(c.step_dir(3))
    monkeypatch.undo()

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(c.manager, "save", no_space)
    with pytest.raises(storage.StorageError, match=rf"cannot save checkpoint 3 to {c.directory}: "
                       r"No space left on device \([\d.]+ MiB free\)"):
        c.save(3, _state(3), {"iteration": 3})
    monkeypatch.undo()
    assert c.restore(_state(0))[1]["iteration"] == 2  # the intact steps are untouched
    c.close()


def test_check_space_needs_a_copy_per_step_still_to_keep(tmp_path, monkeypatch):
    c = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
    nbytes = ckpt_lib.state_nbytes(_state(0))
    assert nbytes == 64 * 64 * 4 + 4
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(1 << 40, 0, 3 * nbytes - 1))
    with pytest.raises(storage.StorageError, match=r"3 checkpoint\(s\)"):
        c.check_space(_state(0))
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(1 << 40, 0, 3 * nbytes))
    c.check_space(_state(0))
    c.close()


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


def test_close_names_the_directory_and_keeps_the_first_error(tmp_path, monkeypatch):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "wd"))
    monkeypatch.setattr(ckpt.manager, "close", lambda: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(storage.StorageError, match=r"cannot finish the checkpoints in .*"
                       r"checkpoints: Read-only file system"):
        ckpt.close()
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "wd2"))
    ckpt._unmanifested = [3]
    monkeypatch.setattr(ckpt.manager, "wait_until_finished", lambda: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    monkeypatch.setattr(ckpt.manager, "close", lambda: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(storage.StorageError, match="cannot save checkpoint 3 to .*No space"):
        ckpt.close()  # the pending save's error, not the manager's
