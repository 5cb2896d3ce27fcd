"""Bad command lines, configs and resumes fail up front: exit 2, one line naming the field (and
the valid choices), no traceback, nothing written. Value checks run in-process (fast); a few
subprocesses check the exit code and that the workdir is never created."""
import json
import os
import subprocess
import sys

import jax
import pytest
from ml_collections import ConfigDict

from configs import default
from trustrl.training import config_validation as cv, resume
from trustrl import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "--config=configs/default.py:tiny"


def tiny(**overrides):
    """The tiny config with dotted overrides, built from a dict so a value may have any type."""
    d = default.get_config("tiny").to_dict()
    for k, v in overrides.items():
        node = d
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return ConfigDict(d)


def _main(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "trustrl.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- command-line parsing: exits before jax is imported (about a second each) ---------------

@pytest.mark.parametrize("args,needles", [
    ([TINY, "--config.loss.methd=ppo_clip"],
     ["unknown field config.loss.methd", "did you mean config.loss.method?", "agg, alpha"]),
    ([TINY, "--config.optim.learning_rate=abc"],
     ["config.optim.learning_rate must be a float, got 'abc'"]),
    ([TINY, "--config.train.iterations=2.5"],
     ["config.train.iterations must be an int, got '2.5'"]),
    (["--config=configs/default.py:nope"], ["unknown variant 'nope'", "'default', 'tiny'"]),
    (["--config=configs/nope.py"], ["config file 'configs/nope.py' not found"]),
    ([TINY, "--workdirr=x"], ["usage:", "Unknown command line flag 'workdirr'"]),
    ([TINY, "stray"], ["usage:", "unexpected arguments ['stray']"]),
])
def test_bad_command_line_exits_2_without_creating_the_workdir(tmp_path, subprocess_env, args,
                                                                needles):
    wd = tmp_path / "run"
    out = _main([*args, f"--workdir={wd}"], subprocess_env, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("invalid config: ", "usage: ")), lines
    for needle in needles:
        assert needle in lines[0]
    assert not wd.exists()


def test_missing_workdir_is_a_usage_error(subprocess_env):
    out = _main([TINY], subprocess_env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"{cli.USAGE}: --workdir is required"


def test_describe_parse_error_in_process():
    argv = ["main", TINY, "--config.mesh.dta=2"]
    msg = cli.describe_parse_error(argv, AttributeError("dta"))
    assert msg == ("invalid config: unknown field config.mesh.dta (did you mean config.mesh.data?)"
                   "; fields of config.mesh: data, fsdp, tensor")
    msg = cli.describe_parse_error(["main", TINY, "--config.seed.x=1"], AttributeError("x"))
    assert "(config.seed is a value of type int, not a group)" in msg
    msg = cli.describe_parse_error(["main", TINY, "--config.log.progress=maybe"], ValueError())
    assert msg == "invalid config: config.log.progress must be a bool, got 'maybe'"
    assert cli.describe_parse_error(["main", "--workdir=w"], ValueError()).endswith(
        "--config is required")


# --- values: validate(cfg), in-process --------------------------------------------------------

@pytest.mark.parametrize("field,value,needle", [
    ("seed", -1, "seed must be an int >= 0, got -1"),
    ("task.seed", -3, "task.seed must be an int >= 0"),
    ("rollout.top_p", 0.0, r"rollout.top_p must be in (0, 1], got 0.0"),
    ("rollout.top_p", 1.5, r"rollout.top_p must be in (0, 1], got 1.5"),
    ("task.num_test", 0, "task.num_test must be an int >= 1, got 0"),
    ("rollout.max_refill_rounds", -1, "rollout.max_refill_rounds must be an int >= 0, got -1"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep must be an int >= 1, got 0"),
    ("train.iterations", 2.5, "train.iterations must be an int, got 2.5 (float)"),
    ("train.minibatches", True, "train.minibatches must be an int, got True (bool)"),
    ("rollout.prompts_per_iter", "4", "rollout.prompts_per_iter must be an int, got '4' (str)"),
    ("optim.learning_rate", "abc", "optim.learning_rate must be a number, got 'abc' (str)"),
    ("optim.learning_rate", float("nan"), "optim.learning_rate must be finite, got nan"),
    ("optim.learning_rate", float("inf"), "optim.learning_rate must be finite, got inf"),
    ("optim.b2", 1.0, r"optim.b2 must be in [0, 1), got 1.0"),
    ("loss.delta_high", float("nan"), "loss.delta_high must be finite"),
    ("loss.is_cap", 0.0, "loss.is_cap must be in (0, inf), got 0.0"),
    ("log.progress", "yes", "log.progress must be a bool, got 'yes' (str)"),
    ("model.hf_dir", None, "model.hf_dir must be a str, got None"),
    ("eval.k", 0, "eval.k must be an int >= 1, got 0"),
    ("mesh.data", 2.0, "mesh sizes must be positive ints"),
    ("task.name", "gsm8k", "task.name='gsm8k' reads downloaded files: set task.manual_dir"),
])
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError) as e:
        cv.validate(tiny(**{field: value}))
    assert needle in str(e.value)


def test_group_size_one_is_rejected_with_the_reason():
    for adv, why in (("group_mean", "zero advantages and give no gradient"),
                     ("grpo", "zero advantages and give no gradient"),
                     ("rloo", "divides by group_size - 1")):
        with pytest.raises(ValueError) as e:
            cv.validate(tiny(**{"rollout.group_size": 1, "train.minibatches": 1,
                                "loss.advantage": adv}))
        assert f"rollout.group_size must be >= 2 with loss.advantage='{adv}', got 1" in str(e.value)
        assert why in str(e.value)
    cv.validate(tiny(**{"rollout.group_size": 2, "loss.advantage": "rloo"}))  # the boundary


def test_math_task_num_test_zero_is_allowed_by_validate():
    # a math set's own test split makes num_test unused; check_environment decides with the files
    cv.validate(tiny(**{"task.name": "gsm8k", "task.manual_dir": "/x", "task.num_test": 0}))


# --- the host: check_environment(cfg, workdir), in-process ------------------------------------

@pytest.mark.parametrize("mesh,needle", [
    (dict(data=16, fsdp=1, tensor=4), "needs 64 devices, have 8"),
    (dict(data=3, fsdp=1, tensor=4), "needs 12 devices, have 8"),
    (dict(data=-1, fsdp=3, tensor=1), "8 devices not divisible by fixed mesh sizes"),
])
def test_mesh_must_fit_the_devices(tmp_path, mesh, needle):
    assert jax.device_count() == 8
    with pytest.raises(ValueError) as e:
        cv.check_environment(tiny(mesh=mesh), str(tmp_path / "run"))
    assert str(e.value).startswith("mesh does not fit the 8 available devices") and needle in str(
        e.value)
    cv.check_environment(tiny(mesh=dict(data=-1, fsdp=2, tensor=1)), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_model_tokenizer_and_data_paths_are_checked(tmp_path):
    wd = str(tmp_path / "run")
    with pytest.raises(ValueError, match="model.hf_dir='/nonexistent/m' is not a directory"):
        cv.check_environment(tiny(**{"model.hf_dir": "/nonexistent/m", "warmstart.steps": 0}), wd)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as e:
        cv.check_environment(tiny(**{"model.hf_dir": str(empty), "warmstart.steps": 0}), wd)
    assert "missing config.json, model.safetensors" in str(e.value)
    with pytest.raises(ValueError, match="tokenizer.path=.* has no tokenizer.json"):
        cv.check_environment(tiny(**{"tokenizer.path": str(empty)}), wd)
    gsm = {"task.name": "gsm8k", "task.manual_dir": str(tmp_path / "nope")}
    with pytest.raises(ValueError, match="task.manual_dir=.*nope.*is not a directory"):
        cv.check_environment(tiny(**gsm), wd)
    gsm["task.manual_dir"] = str(empty)
    with pytest.raises(ValueError, match="no source files found"):
        cv.check_environment(tiny(**gsm), wd)
    (empty / "train.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    with pytest.raises(ValueError, match="task.num_test must be >= 1: the files in task.manual"):
        cv.check_environment(tiny(**gsm, **{"task.num_test": 0}), wd)
    cv.check_environment(tiny(**gsm), wd)  # train only, 16 held out
    assert not os.path.exists(wd)


def test_workdir_must_be_creatable(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(ValueError, match="--workdir=.*file' exists and is not a directory"):
        cv.check_environment(tiny(), str(f))
    with pytest.raises(ValueError, match="cannot be created: .*file' is not a directory"):
        cv.check_environment(tiny(), str(f / "run"))
    assert f.read_text() == "keep"


@pytest.mark.parametrize("args,needle", [
    (["--config.mesh.data=16"], "invalid config: mesh does not fit the 8 available devices"),
    (["--config.rollout.max_refill_rounds=-1"],
     "invalid config: rollout.max_refill_rounds must be an int >= 0, got -1"),
])
def test_bad_value_exits_2_before_the_workdir_exists(tmp_path, subprocess_env, args, needle):
    wd = tmp_path / "run"
    out = _main([TINY, f"--workdir={wd}", *args], subprocess_env, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert needle in out.stderr
    assert not wd.exists()


# --- resume: the recorded config ----------------------------------------------------------------

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
                                         "has 9 bytes, 2\\d+ when written"):
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
