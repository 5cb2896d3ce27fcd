"""Durable run state: each corruption is produced for real on a saved state, then the recovery or
the clear error is asserted (checkpoints, metrics.jsonl, tokenizer, warm-start cache, workdir).

Tests run as root, where chmod does not stop writes: a read-only filesystem is simulated by
making os.fsync fail with EROFS, a full disk by monkeypatching shutil.disk_usage / os.write.
"""
import errno
import glob
import json
import os
import re
import shutil

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.infra import checkpoint as ckpt_lib
from trustrl.infra import integrity, storage
from trustrl.training import experiment, loop as train, warmstart
from trustrl.data import tasks
from trustrl.data import tokenizer as tk
from trustrl.infra.metrics import MetricWriter, read_jsonl

from test_train import tiny  # the tiny config with dotted overrides




# --- checkpoints ---------------------------------------------------------------------------------

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


# --- metrics.jsonl -------------------------------------------------------------------------------

def _rows(path, steps):
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "reward/mean": s / 10}) + "\n")


def test_partial_last_line_is_dropped_and_reported(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _rows(path, [1, 2, 3])
    with open(path, "a") as f:
        f.write('{"step": 4, "reward/me')  # a kill in the middle of a row
    with pytest.warns(UserWarning, match=rf"{path}: skipped 1 unreadable line\(s\): line 4: "
                      r"partial last line"):
        assert [r["step"] for r in read_jsonl(str(path))] == [1, 2, 3]
    w = MetricWriter(str(tmp_path), tensorboard=False, resume_step=3)
    assert f"dropped line 4 of {path}: partial last line" in capsys.readouterr().out
    w.write(4, {"reward/mean": 0.4})
    w.close()
    assert path.read_text().count("\n") == 4
    assert [r["step"] for r in read_jsonl(str(path))] == [1, 2, 3, 4]  # no warning now


def test_rows_past_the_resumed_iteration_are_dropped(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _rows(path, [1, 2, 3, 4, 5])
    MetricWriter(str(tmp_path), tensorboard=False, resume_step=2).close()
    assert "dropped 3 rows" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    before = path.read_bytes()
    MetricWriter(str(tmp_path), tensorboard=False, resume_step=2).close()
    assert path.read_bytes() == before and capsys.readouterr().out == ""  # nothing to repair


def test_complete_row_without_newline_is_kept_and_terminated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _rows(path, [1])
    with open(path, "a") as f:
        f.write(json.dumps({"step": 2}))  # killed between the row and its newline
    w = MetricWriter(str(tmp_path), tensorboard=False, resume_step=2)
    w.write(3, {"reward/mean": 0.3})
    w.close()
    assert [r["step"] for r in read_jsonl(str(path))] == [1, 2, 3]  # 3 not glued onto 2


def test_read_jsonl_reports_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _rows(path, [1, 2])
    with open(path, "a") as f:
        f.write("\x00\x00garbage\n[1, 2]\n" + json.dumps({"step": 3}) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable line\(s\): line 3: not JSON .*; "
                      r"line 4: not an object with an integer 'step'"):
        assert [r["step"] for r in read_jsonl(str(path))] == [1, 2, 3]


def test_failed_metric_write_leaves_no_partial_row(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _rows(path, [1])
    before = path.read_bytes()
    w = MetricWriter(str(tmp_path), tensorboard=False, resume_step=1)
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills up half-way through the row
        if len(data) > 8:
            return real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(storage.StorageError, match=rf"cannot append a row to {path}: No space "
                       r"left on device \([\d.]+ MiB free\)"):
        w.write(2, {"reward/mean": 0.2})
    monkeypatch.undo()
    assert path.read_bytes() == before


# --- tokenizer and warm-start cache -------------------------------------------------------------

@pytest.fixture(scope="module")
def examples():
    return tasks.generate_splits("arithmetic", difficulty=2, num_train=256, num_test=0)["train"]


def test_interrupted_save_leaves_no_directory(tmp_path, monkeypatch, examples):
    tok = tk.train_bpe([f"{e['prompt']} {e['answer']}" for e in examples], 264, split_digits=True)
    real = storage.atomic_write
    calls = []

    def killed_after_first_file(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill between the two files
        real(path, data)
    monkeypatch.setattr(storage, "atomic_write", killed_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        tok.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path)) == []  # neither a half directory nor the temporary one
    monkeypatch.undo()
    tok.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["tokenizer.json", "tokenizer_config.json"]
    # into an existing directory: a failed write keeps the old file whole
    cfg_file = tmp_path / "tok" / "tokenizer_config.json"
    old = cfg_file.read_bytes()
    tok.config["eos_token"] = "<|im_end|>"
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(storage.StorageError, match="No space left"):
        tok.save(tmp_path / "tok")
    monkeypatch.undo()
    assert cfg_file.read_bytes() == old and sorted(os.listdir(tmp_path / "tok")) == [
        "tokenizer.json", "tokenizer_config.json"]


def test_from_dir_names_the_broken_file(tmp_path, examples):
    tk.train_bpe([f"{e['prompt']} {e['answer']}" for e in examples], 264,
                 save_dir=tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text("")
    with pytest.raises(ValueError, match=r"tokenizer_config.json is not valid JSON"):
        tk.Tokenizer.from_dir(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tok/tokenizer.json cannot be loaded"):
        tk.Tokenizer.from_dir(tmp_path / "tok")


@pytest.mark.parametrize("damage", ["empty_config", "missing_config", "missing_vocab"])
def test_run_tokenizer_damaged_is_refused_or_rebuilt_without_record(tmp_path, capsys, examples,
                                                                   damage):
    """With its integrity record, a damaged saved tokenizer is refused naming the file; without
    one (an older trustrl's non-atomic save) an incomplete one is kept aside and trained again."""
    cfg = tiny()
    wd = str(tmp_path)
    first = experiment._tokenizer(cfg, wd, examples)
    saved = tmp_path / "tokenizer"
    damaged = {"empty_config": "tokenizer_config.json", "missing_config": "tokenizer_config.json",
               "missing_vocab": "tokenizer.json"}[damage]
    {"empty_config": lambda: (saved / "tokenizer_config.json").write_text(""),
     "missing_config": lambda: (saved / "tokenizer_config.json").unlink(),
     "missing_vocab": lambda: (saved / "tokenizer.json").unlink()}[damage]()
    with pytest.raises(integrity.IntegrityError,
                       match=rf"refusing to resume: {saved}/{damaged} .*(has 0 bytes|missing)"):
        experiment._tokenizer(cfg, wd, examples)
    (saved / integrity.TREE_RECORD).unlink()  # as saved by an older trustrl
    capsys.readouterr()
    again = experiment._tokenizer(cfg, wd, examples)
    out = capsys.readouterr().out
    assert f"tokenizer: {saved} is incomplete" in out and "training it again" in out
    aside = re.search(r"kept it as (\S+)", out).group(1)
    assert os.path.isdir(aside)  # nothing deleted
    assert again.eos_id is not None and again.eos_id == first.eos_id
    assert again.backend.to_str() == first.backend.to_str()  # identical vocabulary
    assert tk.Tokenizer.from_dir(saved).eos_id == first.eos_id  # and saved complete again
    integrity.verify_tree(str(saved), "tokenizer", strict=True)  # with its record
    with pytest.raises(ValueError, match=r"has 264 tokens but tokenizer.vocab_size=270"):
        experiment._tokenizer(tiny(**{"tokenizer.vocab_size": 270}), wd, examples)


def test_warm_start_without_eos_fails_even_with_a_cache(tmp_path, examples):
    texts = [f"{e['prompt']} {e['answer']}" for e in examples]
    with_eos = tk.train_bpe(texts, 264)
    no_eos = tk.Tokenizer(with_eos.backend, dict(with_eos.config, eos_token=None, pad_token=None))
    cfg = tiny(**{"warmstart.cache_dir": str(tmp_path)})
    env = experiment.TaskEnv(no_eos, "arithmetic", "plain", examples, [])
    mcfg = experiment.model_config(cfg, no_eos.vocab_size)
    # the old key ignored the eos: the key now tells the two tokenizers apart
    assert warmstart.cache_key(cfg, env, mcfg) != warmstart.cache_key(
        cfg, experiment.TaskEnv(with_eos, "arithmetic", "plain", examples, []), mcfg)
    path = tmp_path / f"warmstart-{warmstart.cache_key(cfg, env, mcfg)}.msgpack"
    path.write_bytes(b"a cached base")
    with pytest.raises(ValueError, match="the warm start needs a tokenizer with an eos token"):
        warmstart.warm_start(cfg, env, mcfg, params=None, mesh=None)


def test_corrupt_warm_start_cache_is_reported_and_ignored(tmp_path, capsys):
    """Entries that match their integrity record but not the model (or hold non-finite values)
    are rejected too, and kept aside (see test_integrity.py for entries failing the record)."""
    params = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4)}}
    path = str(tmp_path / "warmstart-x.msgpack")
    integrity.write_file(path, flax.serialization.msgpack_serialize(
        jax.tree.map(np.asarray, params)))
    loaded = warmstart._load_cached(path, params)
    np.testing.assert_array_equal(np.asarray(loaded["a"]), np.asarray(params["a"]))
    blob = open(path, "rb").read()
    for bad, why in [(blob[:len(blob) // 2], ""), (b"", ""),
                     (flax.serialization.msgpack_serialize({"a": np.zeros((3, 2)),
                                                            "b": {"c": np.ones(4)}}),
                      "shapes differ from the model's at \\['a'\\]"),
                     (flax.serialization.msgpack_serialize({"a": np.full((2, 3), np.nan),
                                                            "b": {"c": np.ones(4)}}),
                      "non-finite")]:
        integrity.write_file(path, bad)
        assert warmstart._load_cached(path, params) is None
        out = capsys.readouterr().out
        assert f"warm start: ignoring cache {path}, training again" in out
        assert re.search(why, out), out
        assert not os.path.exists(path)  # kept aside, not deleted
        aside = re.search(r"kept it as (\S+)", out).group(1)
        assert open(aside, "rb").read() == bad  # the earlier ones are not overwritten


# --- workdir --------------------------------------------------------------------------------------

def _no_build(*a, **k):
    raise AssertionError("experiment.build ran: the storage check came too late")


def test_workdir_below_a_regular_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(experiment, "build", _no_build)
    with pytest.raises(storage.StorageError, match=rf"workdir {tmp_path}/file/run cannot be "
                       rf"created: {tmp_path}/file is a file, not a directory"):
        train.train(tiny(), str(tmp_path / "file" / "run"))


def test_read_only_workdir_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "build", _no_build)

    def read_only(fd):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "fsync", read_only)
    with pytest.raises(storage.StorageError, match=rf"workdir {tmp_path}/run is not writable: "
                       r"Read-only file system"):
        train.train(tiny(), str(tmp_path / "run"))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "run") == []  # the probe file is gone


def test_full_disk_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "build", _no_build)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(1 << 40, 0, 10 * 2**20))
    with pytest.raises(storage.StorageError, match=r"not enough free space for the run's outputs "
                       r"\(workdir\) in .*: 10.0 MiB free, needs at least 64.0 MiB"):
        train.train(tiny(), str(tmp_path / "run"))


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_recovers_from_damaged_checkpoint_metrics_and_tokenizer(tmp_path, capsys):
    """A 2-iteration run; then its latest checkpoint, metrics tail and tokenizer config are
    damaged; the rerun (3 iterations) falls back to step 1, replays 2 and 3, and ends clean."""
    common = {"checkpoint.every": 1, "eval.every": 0}
    wd = tmp_path / "run"
    train.train(tiny(**common, **{"train.iterations": 2}), str(wd))
    ckpt_dir = wd / "checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]
    vocab = (wd / "tokenizer" / "tokenizer.json").read_text()
    _corrupt(str(ckpt_dir / "2"), "flip")
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    (wd / "tokenizer" / "tokenizer_config.json").write_text("")
    # a tokenizer with its integrity record would be refused (test_integrity.py): this one is
    # as an older trustrl's interrupted, non-atomic save left it, with no record
    (wd / "tokenizer" / integrity.TREE_RECORD).unlink()
    capsys.readouterr()
    state, _ = train.train(tiny(**common, **{"train.iterations": 3}), str(wd))
    out = capsys.readouterr().out
    assert "is incomplete, training it again" in out
    assert f"step 2 in {ckpt_dir} cannot be restored" in out and "sha256 mismatch" in out
    assert "fell back to step 1" in out and "at iteration 1" in out
    assert "dropped line 3 of" in out and "dropped 1 rows" in out
    removed = (wd / "metrics.jsonl.removed").read_text()  # what the repair dropped is kept
    assert '{"step": 3, "rew' in removed and '"step": 2' in removed
    assert [r["step"] for r in read_jsonl(str(wd / "metrics.jsonl"))] == [1, 2, 3]
    assert int(state.step) == 3 * 2  # iterations 2 and 3 replayed on top of step 1 (2 minibatches)
    assert sorted(os.listdir(ckpt_dir)) == ["2", "3"]
    assert os.listdir(wd / "checkpoints_damaged") == ["2"]
    assert (wd / "tokenizer" / "tokenizer.json").read_text() == vocab
    assert tk.Tokenizer.from_dir(wd / "tokenizer").eos_id is not None
