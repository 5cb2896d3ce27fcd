"""training.loop.train: workdir checks before any work; recovery from damaged run state."""
import errno
import os
import shutil

import pytest

from trustrl.infra import integrity, storage
from trustrl.training import experiment, loop as train
from trustrl.data import tokenizer as tk
from trustrl.infra.metrics import read_jsonl

from test_train import tiny  # the tiny config with dotted overrides
from test_checkpoint import _corrupt  # damages a saved checkpoint step


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
