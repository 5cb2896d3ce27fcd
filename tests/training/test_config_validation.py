"""Bad command lines, configs and resumes fail up front: exit 2, one line naming the field (and
the valid choices), no traceback, nothing written. Value checks run in-process (fast); a few
subprocesses check the exit code and that the workdir is never created."""
import json
import os
import subprocess

import jax
import pytest
from ml_collections import ConfigDict

from configs import default
from trustrl.training import config_validation as cv

from test_main import TINY, _main  # `python -m trustrl.main ARGS`
from test_multihost import REPO, _cli  # `python -m trustrl.main` on the tiny config


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


# -- late failures become early one-line errors -------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--config.loss.method=dppo_topk_tv", "--config.rollout.record_topk=1000"],
     "rollout.record_topk=1000 is larger than the vocabulary (tokenizer.vocab_size = 264)"),
    (["--config.rollout.top_k=1000"], "rollout.top_k=1000 is larger than the vocabulary"),
    (["--config.tokenizer.vocab_size=100"], "tokenizer.vocab_size=100 is below the trained "
                                            "BPE's 256 byte symbols + 3 special tokens = 259"),
    (["--config.model.num_heads=3", "--config.model.num_kv_heads=2"],
     "model.num_heads=3 must be a multiple of model.num_kv_heads=2"),
    (["--config.task.operations=+?"], "task.operations='+?': arithmetic operations='+?' must "
                                      "be a non-empty string of"),
    (["--config.task.difficulty=40"], "arithmetic difficulty (digits per operand) must be in "
                                      "[1, 12], got 40"),
    (["--config.task.seed=4294967296"], "task.seed must be an int in [0, 4294967295]"),
    (["--config.mesh.data=-1", "--config.rollout.max_rows=3"],
     "rollout.max_rows=3 is not divisible by the mesh's batch axes (data x fsdp = 2"),
    (["--config.rollout.temperature=1e-30"],
     "rollout.temperature=1e-30 is below 0.001: logits / T then overflow"),
    # environment episodes (issue 30)
    (["--config.env.id=trustrl:guess_sum", "--config.env.max_turns=0"],
     "env.max_turns must be an int >= 1, got 0"),
])
def test_values_known_before_any_build_fail_before_writing(tmp_path, subprocess_env, args,
                                                           needle):
    wd = tmp_path / "wd"
    out = subprocess.run(_cli(wd, *args), cwd=REPO, env=subprocess_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert needle in out.stderr and out.stderr.startswith("invalid config: ")
    assert not wd.exists()


@pytest.mark.parametrize("fields,needle", [
    ({"id": "trustrl:nope"}, "env.id='trustrl:nope': unknown trustrl environment 'nope'; valid: "
                             "['trustrl:guess_sum'"),
    ({"id": "Sudoku"}, "env.id='Sudoku' is not valid: give '<source>:<name>'"),
    ({"id": "trustrl:guess_sum", "template": "chat"}, "env.template='chat' is not valid"),
    ({"id": "trustrl:guess_sum", "advantage": "step"}, "env.advantage='step' is not valid"),
    ({"id": "trustrl:guess_sum", "max_turn_tokens": 99}, "env.max_turn_tokens=99 exceeds "
                                                         "env.max_total_tokens=64"),
])
def test_environment_fields(fields, needle):
    cfg = tiny()
    cfg.env.update(fields)
    with pytest.raises(ValueError) as e:
        cv.validate(cfg)
    assert needle in str(e.value)


def test_a_gem_environment_without_the_envs_extra_names_it(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gem" else real(name, *a))
    cfg = tiny()
    cfg.env.id = "game:Sudoku-v0-easy"
    with pytest.raises(ValueError, match=r"needs the optional 'envs' extra .*pip install -e "
                                         r"'\.\[envs\]'"):
        cv.validate(cfg)


def test_a_hf_dir_is_checked_from_its_config_json(tmp_path):
    import ml_collections
    from configs import default
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    cfg = default.get_config("tiny")
    cfg.model.hf_dir = str(d)
    cfg.warmstart.steps = 0
    for hf_cfg, needle in [
            ({"num_attention_heads": 9, "num_key_value_heads": 2, "hidden_size": 72,
              "vocab_size": 500}, "num_heads=9 must be a multiple of"),
            ({"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
              "vocab_size": 10}, "rollout.top_k=20 is larger than the vocabulary (vocab_size "
                                 "of")]:
        (d / "config.json").write_text(json.dumps(hf_cfg))
        cfg.rollout.top_k = 20
        with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
            cv.check_environment(cfg, str(tmp_path / "wd"))
    assert isinstance(cfg, ml_collections.ConfigDict)


def test_a_tokenizer_path_is_checked_against_the_sampling_fields(tmp_path):
    from configs import default
    from trustrl.data.tokenizer import train_bpe
    d = tmp_path / "tok"
    train_bpe(["1 + 2 = 3", "4 + 5 = 9"] * 20, 262, save_dir=str(d))
    cfg = default.get_config("tiny")
    cfg.tokenizer.path = str(d)
    cfg.rollout.top_k = 263
    with pytest.raises(ValueError, match=r"rollout.top_k=263 is larger than the vocabulary \(the "
                                         r"vocabulary of .*tokenizer.json = 262\)"):
        cv.check_environment(cfg, str(tmp_path / "wd"))
    cfg.rollout.top_k = 262
    cv.check_environment(cfg, str(tmp_path / "wd"))  # at the vocabulary's size: fine
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.path: cannot load .*tokenizer.json"):
        cv.check_environment(cfg, str(tmp_path / "wd"))
