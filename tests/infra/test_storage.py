"""Workdirs on object storage: trustrl.infra.storage, checkpoints, metrics, TensorBoard, plots and a
whole run with a resume on gs://, against a local GCS emulator (gcp-storage-emulator, started in
this process). gcsfs (our files, Orbax's metadata through etils epath) and TensorStore (Orbax's
array data) speak the GCS JSON API to it over HTTP, as they would to a real bucket."""
import json
import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.infra import storage

BUCKET = "trustrl-test"  # conftest.GCS_BUCKET, the emulator's bucket


@pytest.fixture
def gs(gcs_server):
    """A fresh gs:// prefix for one test."""
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """The same storage operations on a local directory and on the emulated bucket."""
    if request.param == "local":
        return str(tmp_path / "wd")
    request.getfixturevalue("gcs_server")
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"


def test_paths_and_local_dirs(monkeypatch, tmp_path):
    assert storage.scheme("gs://b/x") == "gs" and storage.scheme("/tmp/x") is None
    assert storage.is_remote("s3://b/x") and not storage.is_remote("relative/dir")
    assert storage.join("gs://b/run/", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.join("/a", "b") == "/a/b"
    assert storage.absolute("gs://b/run") == "gs://b/run"
    assert storage.absolute("rel") == os.path.abspath("rel")
    assert storage.basename("gs://b/run/seed1/") == "seed1"
    assert storage.dirname("gs://b/run/x.json") == "gs://b/run"
    monkeypatch.setenv("TRUSTRL_CACHE", str(tmp_path))
    assert storage.local_dir("gs://b/runs/../x") == str(tmp_path / "workdirs" / "gs" / "b" /
                                                        "runs" / "x")
    assert storage.local_dir("wd/run") == "wd/run"  # a local workdir holds its own data
    with pytest.raises(ValueError, match=r"nosuchfs:// paths need an fsspec implementation"):
        storage.check_supported("nosuchfs://bucket/run")


def test_write_read_append_list_move(root):
    a = storage.join(root, "a.txt")
    storage.makedirs(root)
    storage.write(a, "one\n")
    storage.append(a, b"two\n")
    assert storage.read_text(a) == "one\ntwo\n" and storage.isfile(a) and not storage.isdir(a)
    storage.write(storage.join(root, "d", "e", "b.bin"), b"\x00\x01")
    assert storage.files(root) == {"a.txt": 8, "d/e/b.bin": 2}
    assert storage.isdir(storage.join(root, "d")) and storage.size(a) == 8
    storage.write(a, b"replaced")  # a whole-file write replaces the content
    assert storage.read_bytes(a) == b"replaced"
    storage.move_tree(storage.join(root, "d"), storage.join(root, "moved"))
    assert storage.files(root) == {"a.txt": 8, "moved/e/b.bin": 2}
    assert not storage.exists(storage.join(root, "d", "e", "b.bin"))
    storage.remove(a)
    storage.rmtree(storage.join(root, "moved"))
    assert storage.files(root) == {} and not storage.exists(a)


def test_write_probe_and_free_space_on_a_bucket(gs):
    from trustrl.infra import storage
    storage.check_writable(gs, "workdir")  # a probe object is written and deleted
    assert storage.files(gs) == {}
    storage.check_free_space(gs, 2**60, "anything")  # object storage: no free-space figure
    with pytest.raises(storage.StorageError, match="workdir gs://no-such-bucket-x/run is not "
                                                   "writable"):
        storage.check_writable("gs://no-such-bucket-x/run", "workdir")


def _state(scale):
    return {"w": jnp.arange(8.0) * scale, "b": jnp.ones((2, 3)) * scale}


def test_checkpoints_on_a_bucket_manifest_fallback_and_quarantine(gs):
    from trustrl.infra import checkpoint as ckpt_lib
    c = ckpt_lib.Checkpointer(gs, max_to_keep=3)
    assert c.directory == f"{gs}/checkpoints"  # not made local (abspath) as before
    c.check_space(_state(1.0))
    c.save(1, _state(1.0), {"iteration": 1})
    c.save(2, _state(2.0), {"iteration": 2})
    assert c.latest_step() == 2
    files = storage.files(c.step_dir(2))
    assert ckpt_lib.MANIFEST in files and any(k.startswith("state/") for k in files)
    assert ckpt_lib.verify_manifest(c.step_dir(2))
    # on the bucket the manifest holds the store's crc32c per object (no download per save)
    manifest = json.loads(storage.read_text(storage.join(c.step_dir(2), ckpt_lib.MANIFEST)))
    assert all(set(v) == {"size", "crc32c"} for v in manifest["files"].values())
    assert set(manifest["files"]) == set(files) - {ckpt_lib.MANIFEST}
    state, host = c.restore(jax.eval_shape(lambda: _state(0.0)))
    np.testing.assert_array_equal(state["w"], np.arange(8.0) * 2)
    assert host == {"iteration": 2}
    # corrupt one array-data object of step 2 (same size, one byte flipped): step 1 is restored
    # and step 2 moved to checkpoints_damaged/ inside the bucket
    data = max((k for k in storage.files(c.step_dir(2)) if "/d/" in k),
               key=lambda k: storage.files(c.step_dir(2))[k])
    blob = bytearray(storage.read_bytes(storage.join(c.step_dir(2), data)))
    blob[len(blob) // 2] ^= 0xFF
    storage.write(storage.join(c.step_dir(2), data), bytes(blob))
    with pytest.raises(ckpt_lib.CheckpointError, match="crc32c mismatch"):
        ckpt_lib.verify_manifest(c.step_dir(2))
    state, host = c.restore(jax.eval_shape(lambda: _state(0.0)))
    assert host == {"iteration": 1}
    np.testing.assert_array_equal(state["b"], np.ones((2, 3)))
    assert storage.isfile(storage.join(gs, "checkpoints_damaged", "2", ckpt_lib.MANIFEST))
    assert c.latest_step() == 1 and not storage.exists(c.step_dir(2))
    c.save(2, _state(3.0), {"iteration": 2})  # the step can be saved again
    c.close()
    from trustrl.training import resume
    assert resume.latest_checkpoint(gs) == 2


def test_metrics_tensorboard_and_plots_on_a_bucket(gs):
    from trustrl.infra import metrics
    from trustrl.analysis import plot
    w = metrics.MetricWriter(gs, tensorboard=True, resume_step=0)
    for step in range(1, 5):
        w.write(step, {"reward/mean": 0.1 * step, "train/loss": float("nan")})
    w.close()
    rows = metrics.read_jsonl(f"{gs}/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["reward/mean"] == pytest.approx(0.3)
    events = [k for k in storage.files(f"{gs}/tb") if "tfevents" in k]
    assert len(events) == 1
    blob = storage.read_bytes(f"{gs}/tb/{events[0]}")
    assert blob.count(b"reward/mean") == 4  # every flushed scalar made it to the bucket
    # a resume from iteration 2 drops the rows the resumed run writes again
    w = metrics.MetricWriter(gs, tensorboard=False, resume_step=2)
    w.write(3, {"reward/mean": 0.9})
    assert [r["reward/mean"] for r in metrics.read_jsonl(f"{gs}/metrics.jsonl")] == \
        pytest.approx([0.1, 0.2, 0.9])
    written = plot.plot_runs([gs], f"{gs}/plots", metrics=["reward/mean"], smooth=1)
    assert written == [f"{gs}/plots/reward_mean.png"]
    assert storage.read_bytes(written[0])[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_tiny_run_and_its_resume_in_a_bucket(gs, tmp_path, monkeypatch):
    """The whole loop with a gs:// workdir: config check and record, tokenizer kept in the
    bucket, dataset on the host's disk, checkpoints, metrics, resume."""
    from configs import default
    from trustrl.training import config_validation as cv, loop as train, resume
    from trustrl.infra.metrics import read_jsonl
    monkeypatch.setenv("TRUSTRL_CACHE", str(tmp_path / "cache"))
    cfg = default.get_config("tiny")
    cfg.train.iterations, cfg.eval.every = 2, 0
    wd = f"{gs}/run"
    cv.check_environment(cfg, wd)
    assert resume.check_resume(cfg, wd) == ([], [], None)
    resume.record_config(cfg, wd)
    train.train(cfg, wd)
    assert [r["step"] for r in read_jsonl(f"{wd}/metrics.jsonl")] == [1, 2]
    top = storage.files(wd)
    assert {"config.json", "metrics.jsonl", "tokenizer/tokenizer.json"} <= set(top)
    assert any(k.startswith("checkpoints/2/state/") for k in top)
    assert not any(k.startswith("data/") for k in top)  # tfds builds on the local disk
    local = storage.local_dir(wd)
    assert local.startswith(str(tmp_path / "cache")) and os.path.isdir(os.path.join(local, "data"))
    vocab = json.loads(storage.read_text(f"{wd}/tokenizer/tokenizer.json"))["model"]["vocab"]
    # resume: a longer run continues from the bucket's checkpoint with the same config; the
    # local copies are gone (a new VM) and are rebuilt / fetched from the bucket
    import shutil
    shutil.rmtree(local)
    cfg.train.iterations = 3
    assert resume.check_resume(cfg, wd)[2] == 2
    state, _ = train.train(cfg, wd)
    assert [r["step"] for r in read_jsonl(f"{wd}/metrics.jsonl")] == [1, 2, 3]
    assert int(state.step) == 3 * cfg.train.epochs * cfg.train.minibatches
    assert json.loads(storage.read_text(f"{wd}/tokenizer/tokenizer.json"))["model"]["vocab"] \
        == vocab


def test_remote_data_dir_is_refused():
    from configs import default
    from trustrl.training import config_validation as cv
    cfg = default.get_config("tiny")
    cfg.task.data_dir = "gs://bucket/data"
    with pytest.raises(ValueError, match="task.data_dir must be a local path"):
        cv.validate(cfg)


def test_storage_errors_name_the_path_instead_of_raw_os_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(storage.StorageError, match=f"cannot append to {blocker}/m.jsonl"):
        storage.append(str(blocker / "m.jsonl"), b"row\n")
    with pytest.raises(storage.StorageError, match="cannot create the directory"):
        storage.write(str(blocker / "sub" / "f.json"), "{}")
    with pytest.raises(storage.StorageError, match="cannot create the directory"):
        storage.makedirs(str(blocker / "d"))
