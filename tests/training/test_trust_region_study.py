"""The pre-registered trust-region study (configs/trust_region_study.py, launch/
trust_region_study.py): every run's config is valid, the sweep is in the pre-registered priority
order, and the launcher's --small variant runs end to end."""
import os
import subprocess
import sys

import pytest

from configs import trust_region_study as study
from trustrl.training import config_validation as cv

from test_multihost import REPO


def test_every_study_run_validates_and_sets_what_its_name_says():
    entries = study.get_sweep()
    names = [e["config_arg"] for e in entries]
    assert len(entries) == len({(e["config_arg"], e["seed"]) for e in entries}) == 114
    for name in set(names):
        c = study.get_config(name)
        cv.validate(c)
        method, dial, stale = name.split(",")
        assert c.rollout.dtype == study.DIALS[dial][0]
        assert c.rollout.mismatch.noise == study.DIALS[dial][1]
        assert c.rollout.mismatch.staleness == study.STALENESS[stale]
        assert c.train.iterations == study.ITERATIONS >= 300
        assert c.optim.learning_rate == study.STUDY_LEARNING_RATE
        want = study.STUDY_METHODS[method][1].get("method", method if method not in (
            "grpo_clip_higher",) else "ppo_clip")
        assert c.loss.method == want, name
    # the priority order: (a) seed 0 over the four dial settings first, then seeds 1 and 2
    first = [(e["config_arg"], e["seed"]) for e in entries[:12]]
    assert {n.split(",")[0] for n, _ in first} == {"dppo_binary_tv", "grpo_clip_higher", "pg_is"}
    assert {n.split(",")[1] for n, _ in first} == set(study.DIALS)
    assert {s for _, s in first} == {0}
    assert {n.split(",")[0] for n in names[36:60]} == {"drpo", "cppo"}  # (b)
    assert {n.split(",")[2] for n in names[60:78]} == {"s4", "s16"}  # (c)
    with pytest.raises(ValueError, match="unknown dial 'd2'"):
        study.get_config("pg_is,d2,s0")


@pytest.mark.slow
def test_small_study_end_to_end(tmp_path, subprocess_env):
    out = subprocess.run([sys.executable, "launch/trust_region_study.py", "--small",
                          f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path / 'out'}"],
                         cwd=REPO, env=subprocess_env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "out" / "trust_region_small_table.md").read_text()
    assert "| cppo,d3,s4 | 1 |" in table and "| pg_is,d0,s0 | 1 |" in table
    assert os.path.exists(tmp_path / "out" / "trust_region_small_plots" / "reward_mean.png")


def test_finished_runs_are_archived_and_restored(tmp_path, monkeypatch):
    """launch/sanity.archive keeps each finished run's config.json, log.txt and metrics.jsonl
    (gzipped) and the warm-start cache it started from in a tracked folder, once; unarchive
    restores them into a new workdir and cache (a new checkout has neither) and replaces what a
    killed run left, so they count as finished, are not rerun, and new runs share the base."""
    import json

    from launch import sanity, sweep
    monkeypatch.chdir(tmp_path)  # the configs' cache_dir is relative, as in the study's
    entries = [{"config_arg": "pg_is,d0,s0", "seed": 0}, {"config_arg": "cppo,d3,s4", "seed": 0}]
    work, keep, cache = tmp_path / "work", tmp_path / "keep", tmp_path / "cache"
    cache.mkdir()
    (cache / "warmstart-abc.msgpack").write_bytes(b"base")
    for e, last in zip(entries, (2, 1)):  # the second stopped at 1 of 2 iterations
        d = work / sweep.run_name(e)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"train": {"iterations": 2},
                                                   "warmstart": {"cache_dir": "cache"}}))
        (d / "log.txt").write_text("warm start: 5 steps\n")
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "reward/mean": 0.25 * s}) + "\n" for s in range(1, last + 1)))
    done, unfinished = (sweep.run_name(e) for e in entries)
    assert sanity.archive(str(work), entries, str(keep)) == [done]
    assert (keep / done / "metrics.jsonl.gz").exists() and not (keep / unfinished).exists()
    assert (keep / done / "log.txt").read_text() == "warm start: 5 steps\n"
    assert (keep / sanity.BASE / "warmstart-abc.msgpack").read_bytes() == b"base"
    assert sanity.archive(str(work), entries, str(keep)) == []  # once
    import shutil
    shutil.rmtree(cache)
    new = tmp_path / "new"
    (new / done).mkdir(parents=True)  # what a killed run left: no metrics
    assert sanity.unarchive(str(keep), str(new), entries) == [done]
    assert sanity.finished(str(new / done)) and not (new / unfinished).exists()
    assert (new / done / "metrics.jsonl").read_text() == (work / done / "metrics.jsonl").read_text()
    assert (cache / "warmstart-abc.msgpack").read_bytes() == b"base"
    assert sanity.unarchive(str(keep), str(new), entries) == []  # finished: left as it is
