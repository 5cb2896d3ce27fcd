"""A workdir's recorded config (training.resume): what a resume accepts, refuses and records."""
import json
import os
import shutil
import subprocess

import pytest

from configs import default
from trustrl.training import resume

from test_config_validation import tiny  # the tiny config with dotted overrides, any value type
from test_main import TINY, _main  # `python -m trustrl.main ARGS`
from test_multihost import REPO, _cli  # `python -m trustrl.main` on the tiny config


def test_config_changes_classifies_fields():
    old = resume.flatten(tiny())
    new = resume.flatten(tiny(**{"train.iterations": 5, "log.progress": True, "eval.every": 3,
                             "mesh": dict(data=-1, fsdp=1, tensor=1), "loss.method": "ppo_clip",
                             "optim.learning_rate": 1e-3}))
    semantic, operational = resume.config_changes(old, new)
    lr = default.get_config("tiny").optim.learning_rate  # (the default may be retuned)
    assert lr != 1e-3
    assert semantic == [("loss.method", "dppo_binary_tv", "ppo_clip"),
                        ("optim.learning_rate", lr, 1e-3)]
    assert [c[0] for c in operational] == ["eval.every", "log.progress", "mesh.data",
                                           "mesh.tensor", "train.iterations"]
    shorter, _ = resume.config_changes(old, resume.flatten(tiny(**{"train.iterations": 1})))
    assert shorter == [("train.iterations", 2, 1)]  # stopping early is not an extension
    gone, _ = resume.config_changes({**old, "task.extra": 1}, old)
    assert gone == [("task.extra", 1, "<absent>")]


@pytest.mark.slow
def test_resume_checks_the_recorded_config(tmp_path, subprocess_env):
    """One real tiny run (1 iteration) through the entry point, then reruns in its workdir."""
    wd = tmp_path / "run"
    noeval = "--config.eval.every=0"  # the evals' samplers are not what this test is about
    first = _main([TINY, f"--workdir={wd}", "--config.train.iterations=1", noeval],
                  subprocess_env)
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = json.loads((wd / "config.json").read_text())
    assert resume.flatten(recorded) == resume.flatten(tiny(**{"train.iterations": 1,
                                                               "eval.every": 0}))
    assert resume.latest_checkpoint(str(wd)) == 1
    before = {p: (wd / p).read_bytes() for p in ("config.json", "metrics.jsonl")}

    # a semantic change is refused, listing every changed field, and nothing is touched
    out = _main([TINY, f"--workdir={wd}", "--config.train.iterations=1", noeval,
                 "--config.loss.method=ppo_clip", "--config.rollout.top_p=0.9"], subprocess_env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert ("loss.method: 'dppo_binary_tv' -> 'ppo_clip', rollout.top_p: 1.0 -> 0.9"
            in out.stderr and "--allow_config_change" in out.stderr)
    assert {p: (wd / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(wd / "checkpoints")) == ["1"]

    # in-process: extension and operational fields pass with notices; shortening is refused
    notices, changes, step = resume.check_resume(
        tiny(**{"train.iterations": 3, "log.progress": True, "eval.every": 0}), str(wd))
    assert step == 1 and changes == []
    assert notices[0].startswith("notice: extending the run from 1 to 3 iterations (resuming at "
                                 "iteration 1); the optimizer's total steps change from 2 to 6")
    assert notices[1] == "notice: resuming with changed operational fields: log.progress: " \
                         "False -> True"
    with pytest.raises(ValueError, match=r"train.iterations: 1 -> 0"):
        resume.check_resume(tiny(**{"train.iterations": 0, "eval.every": 0}), str(wd))
    (wd / "config.json").write_text("{not json")  # its integrity record no longer matches
    with pytest.raises(ValueError, match="config.json .the config of the run being resumed. "
                                         "has 9 bytes, \\d{4} when written"):
        resume.check_resume(tiny(**{"train.iterations": 1, "eval.every": 0}), str(wd))
    (wd / "config.json").write_bytes(before["config.json"])

    # --allow_config_change continues (here: no iterations left), records what changed
    out = _main([TINY, f"--workdir={wd}", "--config.train.iterations=1", noeval,
                 "--config.loss.delta_high=0.3", "--allow_config_change"], subprocess_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("warning: continuing the run from iteration 1 with a changed config "
            "(--allow_config_change): loss.delta_high: 0.15 -> 0.3") in out.stdout
    assert json.loads((wd / "config.json").read_text())["loss"]["delta_high"] == 0.3
    log = [json.loads(line) for line in (wd / "config_changes.jsonl").read_text().splitlines()]
    assert log == [{"iteration": 1, "changes": {"loss.delta_high": [0.15, 0.3]}}]


def test_record_config_is_atomic_and_round_trips(tmp_path):
    cfg = tiny(**{"loss.is_cap": float("inf")})
    resume.record_config(cfg, str(tmp_path))
    # no tmp file left behind; the integrity record that resumes check it against
    assert sorted(os.listdir(tmp_path)) == ["config.json", "config.json.integrity.json"]
    assert resume.flatten(json.loads((tmp_path / "config.json").read_text())) == resume.flatten(cfg)
    # no checkpoints: nothing to check
    assert resume.check_resume(cfg, str(tmp_path)) == ([], [], None)


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
