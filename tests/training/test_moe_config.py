"""Mixture-of-experts configs (issue 28): cfg.model's MoE fields build a qwen3_moe model, bad MoE
configs fail at start naming the field (exit 2 from the command line), older workdirs resume,
the pod presets of the paper's Table 1 validate, and the tiny MoE preset learns on CPU."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import default, qwen3_moe
from trustrl.infra import sharding
from trustrl.model.transformer import ModelConfig
from trustrl.training import config_validation as cv, experiment, resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_moe(**overrides):
    """configs/default.py:tiny_moe with dotted overrides (built from a dict: any value type)."""
    d = default.get_config("tiny_moe").to_dict()
    for k, v in overrides.items():
        node = d
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return ConfigDict(d)


# --- the fields build the model -----------------------------------------------------------------

def test_fields_build_a_qwen3_moe_model_scanned_when_layers_are_alike():
    cfg = tiny_moe()
    m = experiment.model_config(cfg, 300)
    assert (m.family, m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size) == (
        "qwen3_moe", 4, 2, 32)
    assert m.norm_topk_prob is True and m.moe_impl == "ragged" and m.moe_capacity_factor == 0
    assert m.sparse_layers == (0, 1) and m.scan_layers  # every layer sparse: one scan
    # a dense layer among the sparse ones: the layers differ, so they are unrolled
    m = experiment.model_config(tiny_moe(**{"model.mlp_only_layers": (0,)}), 300)
    assert m.sparse_layers == (1,) and not m.scan_layers
    m = experiment.model_config(tiny_moe(**{"model.num_layers": 4,
                                            "model.decoder_sparse_step": 2}), 300)
    assert m.sparse_layers == (1, 3) and not m.scan_layers
    m = experiment.model_config(tiny_moe(**{"model.mlp_only_layers": (0, 1)}), 300)
    assert m.sparse_layers == () and m.scan_layers  # all dense: alike again
    # the kernel choice reaches the model (also for a model.hf_dir: with_run_fields)
    m = experiment.model_config(tiny_moe(**{"model.moe_impl": "capacity",
                                            "model.moe_capacity_factor": 1.5}), 300)
    assert (m.moe_impl, m.moe_capacity_factor) == ("capacity", 1.5)
    loaded = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=4, head_dim=8, family="qwen3_moe",
                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
    m = experiment.with_run_fields(tiny_moe(**{"model.moe_impl": "dense"}), loaded)
    assert m.moe_impl == "dense" and m.num_experts == 8  # the checkpoint's shape is kept


def test_the_run_records_and_replays_the_routing_of_a_moe():
    """experiment's programs: a MoE's rollout sampler records its routed experts (greedy eval
    does not); with routing_replay the score pass / train step are built to replay them and
    their compiled batch carries them; router_aux_loss_coef reaches the train step."""
    import optax

    class Tok:
        eos_id = 1
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=4), jax.devices()[:8])
    for overrides, replay in (({}, False), ({"model.routing_replay": True,
                                             "model.router_aux_loss_coef": 0.01}, True)):
        cfg = tiny_moe(**overrides)
        m = experiment.model_config(cfg, 300)
        sampler, greedy = experiment.samplers(cfg, Tok(), m, mesh)
        assert sampler.cfg.record_routes and not greedy.cfg.record_routes
        batch = experiment.batch_spec(cfg, sampler.cfg, 8, 16, mesh, old_logp=True, model_cfg=m)
        assert ("routed_experts" in batch) is replay
        if replay:
            assert batch["routed_experts"].shape == (8, 16 + 4, 2, 2)
            assert batch["routed_experts"].dtype == np.uint8
        score = experiment.score_program(cfg, m, mesh)
        assert score.__wrapped__.keywords["routing_replay"] is replay
        step = experiment.train_step_program(cfg, m, m, optax.sgd(0.1), None, mesh)
        kw = step.__wrapped__.keywords
        assert kw["routing_replay"] is replay
        assert kw["router_aux_loss_coef"] == (0.01 if replay else 0.0)
    dense = default.get_config("tiny")
    sampler, _ = experiment.samplers(dense, Tok(), experiment.model_config(dense, 300), mesh)
    assert not sampler.cfg.record_routes


def test_a_dense_config_builds_the_same_model_as_before():
    """Dense runs must not change: the same ModelConfig as before the MoE fields existed (its
    repr keys the warm-start cache)."""
    for variant in ("tiny", "default"):
        cfg = default.get_config(variant)
        m = cfg.model
        before = ModelConfig(
            vocab_size=300, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim, rope_theta=m.rope_theta,
            tie_word_embeddings=m.tie_word_embeddings, param_dtype=m.param_dtype,
            dtype=m.dtype, remat=m.remat, attention=m.attention)
        assert repr(experiment.model_config(cfg, 300)) == repr(before)
        assert experiment.model_config(cfg, 300).family == "llama"


def test_tiny_moe_variant():
    cfg, tiny = default.get_config("tiny_moe"), default.get_config("tiny")
    cv.validate(cfg)
    assert cfg.model.num_experts == 4 and cfg.model.num_experts_per_tok == 2
    changed = {k for k, v in resume.flatten(cfg).items() if resume.flatten(tiny)[k] != v}
    assert changed == {"model.num_layers", "model.num_experts", "model.num_experts_per_tok",
                       "model.moe_intermediate_size"}
    with pytest.raises(ValueError, match="unknown variant 'moe'.*tiny_moe"):
        default.get_config("moe")


# --- bad configs name the field -----------------------------------------------------------------

@pytest.mark.parametrize("overrides,needle", [
    ({"model.num_experts_per_tok": 5},
     "model.num_experts_per_tok=5 is larger than model.num_experts=4: each token is routed to "
     "that many distinct experts; valid: 1 <= num_experts_per_tok <= 4"),
    ({"model.num_experts_per_tok": 0}, "model.num_experts_per_tok=0 is not valid for "
                                       "model.num_experts=4"),
    ({"model.moe_capacity_factor": 1.25},
     "model.moe_capacity_factor=1.25 with model.moe_impl='ragged': a capacity factor (> 0) goes "
     "with moe_impl='capacity' and only with it"),
    ({"model.moe_impl": "capacity"},
     "model.moe_capacity_factor=0.0 with model.moe_impl='capacity'"),
    ({"model.moe_impl": "megablox"},
     "model.moe_impl='megablox' is not valid; choose one of ['ragged', 'dense', 'capacity']"),
    ({"model.mlp_only_layers": (0, 2)},
     "model.mlp_only_layers=[0, 2]: [2] are not layers of the 2-layer model; valid: indices in "
     "[0, 1]"),
    ({"model.mlp_only_layers": (-1,)}, "[-1] are not layers of the 2-layer model"),
    ({"model.mlp_only_layers": "0"}, "model.mlp_only_layers must be a tuple of layer indices"),
    ({"model.num_experts": -1}, "model.num_experts must be an int >= 0, got -1"),
    ({"model.moe_intermediate_size": 0}, "model.moe_intermediate_size must be an int >= 1"),
    ({"model.decoder_sparse_step": 0}, "model.decoder_sparse_step must be an int >= 1"),
    ({"model.router_aux_loss_coef": -0.1}, "model.router_aux_loss_coef must be in [0, inf)"),
    ({"model.routing_replay": 1}, "model.routing_replay must be a bool, got 1 (int)"),
    ({"model.num_experts": 0, "model.routing_replay": True},
     "model.routing_replay=True needs a mixture of experts, but the model is dense "
     "(model.num_experts=0): there are no routed experts to record and replay"),
    ({"model.num_experts": 0, "model.router_aux_loss_coef": 0.01},
     "model.router_aux_loss_coef=0.01 applies to a mixture of experts only, but the model is "
     "dense"),
    ({"model.num_experts": 0, "model.moe_impl": "dense"},
     "model.moe_impl='dense' applies to a mixture of experts only"),
])
def test_bad_moe_values_name_the_field(overrides, needle):
    with pytest.raises(ValueError) as e:
        cv.validate(tiny_moe(**overrides))
    assert needle in str(e.value)


def test_good_moe_values_pass():
    for overrides in ({"model.num_experts_per_tok": 4}, {"model.num_experts_per_tok": 1},
                      {"model.mlp_only_layers": (1,)}, {"model.routing_replay": True},
                      {"model.moe_impl": "capacity", "model.moe_capacity_factor": 1.25},
                      {"model.moe_impl": "dense"}, {"model.router_aux_loss_coef": 0.001},
                      {"model.num_experts_per_tok": 99, "model.num_experts": 0}):  # unused
        cv.validate(tiny_moe(**overrides))


def _rules_with_expert_on(monkeypatch, axes):
    """sharding.LOGICAL_RULES with the 'expert' logical axis mapped to ``axes``."""
    rules = tuple((name, axes if name == "expert" else to) for name, to in sharding.LOGICAL_RULES)
    monkeypatch.setattr(sharding, "LOGICAL_RULES", rules)


def test_the_expert_split_follows_the_rules_table(monkeypatch):
    # whatever the table maps 'expert' to today, the check reads it
    axes, split = cv.expert_split(dict(data=2, fsdp=1, tensor=4))
    want = dict(sharding.LOGICAL_RULES)["expert"]
    want = (want,) if isinstance(want, str) else tuple(want or ())
    assert axes == want and split == int(np.prod([dict(data=2, fsdp=1, tensor=4)[a]
                                                  for a in want]))
    _rules_with_expert_on(monkeypatch, "fsdp")
    assert cv.expert_split(dict(data=2, fsdp=4, tensor=1)) == (("fsdp",), 4)
    cfg = tiny_moe(**{"model.num_experts": 6, "mesh": dict(data=2, fsdp=4, tensor=1)})
    with pytest.raises(ValueError) as e:
        cv.validate(cfg)
    assert str(e.value).startswith(
        "model.num_experts=6 is not divisible by the mesh's expert split (mesh.fsdp=4 = 4: "
        "trustrl.infra.sharding.LOGICAL_RULES shards the 'expert' axis over ['fsdp']); valid: "
        "a mesh whose fsdp divides 6")
    cv.validate(tiny_moe(**{"model.num_experts": 8, "mesh": dict(data=2, fsdp=4, tensor=1)}))
    # a -1 axis is known only with the devices: validate leaves it to check_built
    late = tiny_moe(**{"model.num_experts": 6, "mesh": dict(data=2, fsdp=-1, tensor=1)})
    cv.validate(late)
    mesh = sharding.make_mesh(late.mesh, jax.devices()[:8])
    model_cfg = experiment.model_config(late, 300)
    with pytest.raises(ValueError, match=r"model.num_experts=6 is not divisible by the mesh's "
                                         r"expert split \(mesh.fsdp=4 = 4"):
        cv.check_built(late, 264, model_cfg, mesh)
    _rules_with_expert_on(monkeypatch, ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by the mesh's expert "
                                         r"split \(mesh.data=2 x mesh.fsdp=4 = 8"):
        cv.validate(tiny_moe(**{"mesh": dict(data=2, fsdp=4, tensor=1)}))


def test_check_built_refuses_replay_and_moe_kernels_on_a_dense_model():
    cfg = tiny_moe(**{"model.num_experts": 0, "model.hf_dir": "/x", "warmstart.steps": 0,
                      "model.routing_replay": True})
    cv.validate(cfg)  # a model.hf_dir brings its own shape: known once built / read
    dense = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=4, num_kv_heads=4, head_dim=8)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    with pytest.raises(ValueError, match=r"model.routing_replay=True needs a mixture of experts, "
                                         r"but the model \(model.hf_dir's num_experts=0\) is "
                                         r"dense"):
        cv.check_built(cfg, 264, dense, mesh)
    cfg.model.routing_replay = False
    cv.check_built(cfg, 264, dense, mesh)
    moe_cfg = experiment.model_config(tiny_moe(), 300)
    cv.check_built(tiny_moe(**{"model.routing_replay": True}), 264, moe_cfg, mesh)


def _hf_dir(tmp_path, **hf):
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    base = dict(architectures=["Qwen3MoeForCausalLM"], num_attention_heads=4,
                num_key_value_heads=2, hidden_size=64, head_dim=16, vocab_size=500,
                num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, mlp_only_layers=[], decoder_sparse_step=1)
    (d / "config.json").write_text(json.dumps({**base, **hf}))
    return str(d)


def test_a_moe_hf_dir_is_checked_from_its_config_json(tmp_path, monkeypatch):
    wd = str(tmp_path / "wd")

    def cfg_for(hf_dir, **overrides):
        return tiny_moe(**{"model.hf_dir": hf_dir, "warmstart.steps": 0, **overrides})
    d = _hf_dir(tmp_path)
    cv.check_environment(cfg_for(d, **{"model.routing_replay": True}), wd)
    for hf, needle in [
            (dict(num_experts_per_tok=9), "config.json: num_experts_per_tok=9 is larger than "
                                          ".*config.json: num_experts=8"),
            (dict(mlp_only_layers=[4]), r"config.json: mlp_only_layers=\[4\]: \[4\] are not "
                                        r"layers of the 4-layer model"),
            (dict(num_experts_per_tok=None), "model.hf_dir: cannot read .*config.json: "
                                             "TypeError")]:
        with pytest.raises(ValueError, match=needle):
            cv.check_environment(cfg_for(_hf_dir(tmp_path, **hf)), wd)
    # routing replay on a dense checkpoint
    dense = _hf_dir(tmp_path, architectures=["Qwen3ForCausalLM"], num_experts=0)
    with pytest.raises(ValueError, match=r"model.routing_replay=True needs a mixture of experts, "
                                         r"but model.hf_dir's model is dense \(.*config.json has "
                                         r"no num_experts\)"):
        cv.check_environment(cfg_for(dense, **{"model.routing_replay": True}), wd)
    cv.check_environment(cfg_for(dense), wd)
    # the expert split against the device mesh (here: experts over fsdp = 8 of 12 experts)
    _rules_with_expert_on(monkeypatch, "fsdp")
    d = _hf_dir(tmp_path, num_experts=12)
    with pytest.raises(ValueError, match=r"config.json: num_experts=12 is not divisible by the "
                                         r"mesh's expert split \(mesh.fsdp=8 = 8"):
        cv.check_environment(cfg_for(d, mesh=dict(data=1, fsdp=-1, tensor=1)), wd)
    cv.check_environment(cfg_for(d, mesh=dict(data=2, fsdp=4, tensor=1)), wd)
    assert not os.path.exists(wd)


def test_cli_bad_moe_config_exits_2_with_one_line(tmp_path, subprocess_env):
    wd = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "trustrl.main", "--config=configs/default.py:tiny_moe",
         f"--workdir={wd}", "--config.model.num_experts_per_tok=8"],
        cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert out.stderr.startswith("invalid config: model.num_experts_per_tok=8 is larger than "
                                 "model.num_experts=4")
    # a tuple field from the command line, checked against the model's layers
    out = subprocess.run(
        [sys.executable, "-m", "trustrl.main", "--config=configs/default.py:tiny_moe",
         f"--workdir={wd}", "--config.model.mlp_only_layers=(0,5)"],
        cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert "invalid config: model.mlp_only_layers=[0, 5]: [5] are not layers of the 2-layer " \
           "model" in out.stderr
    assert not wd.exists()


# --- resume: older workdirs -----------------------------------------------------------------------

MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
              "decoder_sparse_step", "mlp_only_layers", "moe_impl", "moe_capacity_factor",
              "router_aux_loss_coef", "routing_replay")


def test_a_workdir_recorded_before_the_moe_fields_resumes():
    new = resume.flatten(default.get_config("tiny"))
    # the added fields' values are the defaults (as JSON reads them)
    for k in MOE_FIELDS:
        assert resume.ADDED_FIELDS[f"model.{k}"] == new[f"model.{k}"], k
    old = {k: v for k, v in new.items() if k.removeprefix("model.") not in MOE_FIELDS}
    assert len(old) == len(new) - len(MOE_FIELDS)
    assert resume.config_changes(old, new) == ([], [])
    # a MoE config against that recorded dense one is a semantic change, named
    semantic, _ = resume.config_changes(old, resume.flatten(default.get_config("tiny_moe")))
    assert ("model.num_experts", 0, 4) in semantic


# --- the pod presets (Table 1) -------------------------------------------------------------------

def test_every_table_1_preset_validates_with_the_papers_numbers():
    table = {  # prompts, group, mini-batch prompts, response, lr, TV delta, replay, model dir
        "base": (256, 16, 32, 16384, 1e-6, 0.2, False, "Qwen3-30B-A3B-Base"),
        "base_r3": (256, 16, 32, 16384, 1e-6, 0.2, True, "Qwen3-30B-A3B-Base"),
        "thinking": (256, 16, 32, 16384, 1e-6, 0.2, False, "Qwen3-30B-A3B"),
        "dense_base": (128, 8, 32, 8000, 1e-6, 0.2, False, "Qwen3-8B-Base"),
        "base_lora": (128, 8, 16, 8000, 1e-5, 0.15, False, "Qwen3-30B-A3B-Base")}
    assert set(table) == set(qwen3_moe.RUNS)
    for run, (prompts, group, mini, response, lr, tv, replay, model) in table.items():
        for method, (loss, delta) in {"tv": ("dppo_binary_tv", tv), "kl": ("dppo_binary_kl", 0.05),
                                      "grpo_clip_higher": ("ppo_clip", 0.2)}.items():
            c = qwen3_moe.get_config(f"{run},{method}")
            cv.validate(c)
            assert (c.loss.method, c.loss.delta_low) == (loss, delta)
            assert c.loss.delta_high == (0.27 if method == "grpo_clip_higher" else delta)
            assert c.loss.is_cap == 5.0 and c.rollout.temperature == 1.0
            assert (c.rollout.prompts_per_iter, c.rollout.group_size) == (prompts, group)
            assert c.rollout.prompts_per_iter // c.train.minibatches == mini
            assert c.rollout.max_new_tokens == response and c.optim.learning_rate == lr
            assert c.model.routing_replay is replay
            assert os.path.basename(c.model.hf_dir) == model
            assert c.model.dtype == "bfloat16" and c.rollout.dtype == "bfloat16"
    assert qwen3_moe.get_config().model.hf_dir.endswith("Qwen3-30B-A3B-Base")
    lora = qwen3_moe.get_config("base_lora").model.lora  # r 32, alpha 64 (Table 1)
    assert (lora.rank, lora.alpha, lora.base_quant) == (32, 64.0, "")
    assert all(qwen3_moe.get_config(r).model.lora.rank == 0 for r in qwen3_moe.RUNS
               if r != "base_lora")
    with pytest.raises(ValueError, match=r"unknown method 'dppo'; valid: \['grpo_clip_higher', "
                                         r"'kl', 'tv'\]"):
        qwen3_moe.get_config("base,dppo")
    with pytest.raises(ValueError, match="unknown run 'moe'"):
        qwen3_moe.get_config("moe")


# --- the tiny MoE preset learns ----------------------------------------------------------------

@pytest.mark.optimized  # execution-bound: compiled at XLA's default level
@pytest.mark.slow
def test_tiny_moe_learns_on_the_default_task(tmp_path):
    """tests/training/test_train.py::test_learning_happens with experts and routing replay (R3):
    16 one-digit additions, a short warm start, then RL iterations of DPPO-Binary-TV; the
    training reward rises, and every iteration logs the routing mismatch."""
    from trustrl.infra.metrics import read_jsonl
    from trustrl.training import loop as train
    cfg = tiny_moe(**LEARN_MOE)
    assert experiment.model_config(cfg, 270).num_experts == 4 and cfg.model.routing_replay
    train.train(cfg, str(tmp_path / "run"))
    rows = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert all(0 <= r["moe/routing_mismatch"] <= 1 for r in rows), rows[-1]
    rewards = [r["reward/mean"] for r in rows]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.03, rewards


LEARN_MOE = {
    "mesh": dict(data=-1, fsdp=1, tensor=1),
    "model.num_layers": 2, "model.hidden_size": 64, "model.intermediate_size": 128,
    "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 16,
    "model.num_experts": 4, "model.num_experts_per_tok": 2, "model.moe_intermediate_size": 64,
    "model.routing_replay": True,
    "task.difficulty": 1, "task.num_train": 16, "task.num_test": 16,
    "tokenizer.vocab_size": 270,
    "warmstart.steps": 100, "warmstart.batch_size": 32, "warmstart.learning_rate": 3e-3,
    "rollout.prompts_per_iter": 16, "rollout.group_size": 8, "rollout.max_new_tokens": 4,
    "train.iterations": 20, "train.minibatches": 2, "optim.learning_rate": 1e-3,
    "optim.warmup_steps": 10, "eval.every": 0, "checkpoint.every": 0,
}
