"""metrics.jsonl (trustrl.infra.metrics): torn, replayed, corrupt rows repaired; no partial row."""
import errno
import json
import os

import pytest

from trustrl.infra import storage
from trustrl.infra.metrics import MetricWriter, read_jsonl


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
