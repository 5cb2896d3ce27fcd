"""LoRA in the trainer: adapter-only state and optimizer, the frozen base untouched, resume,
the base identity check, config validation."""
import dataclasses
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from trustrl.infra.sharding import make_mesh
from trustrl.model import lora
from trustrl.model import transformer as M
from trustrl.training import config_validation, experiment, loop, optim, step as ts

V, P_LEN, N = 64, 3, 4


def _batch(rows=4, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    tokens = jax.random.randint(k[0], (rows, P_LEN + N), 0, V)
    valid = jnp.ones((rows, P_LEN + N), bool)
    return {"tokens": tokens, "positions": M.positions_from_mask(valid), "valid": valid,
            "response_tokens": tokens[:, P_LEN:], "response_mask": jnp.ones((rows, N), bool),
            "rollout_logp": -jax.random.uniform(k[1], (rows, N), minval=0.5, maxval=4.0),
            "advantages": jax.random.normal(k[2], (rows,))}


def _setup(targets=tuple(lora.TARGETS), **kw):
    base_cfg = M.ModelConfig.tiny_shardable(vocab_size=V, **kw)
    cfg = dataclasses.replace(base_cfg, lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    base = M.init_params(base_cfg, jax.random.key(0))
    adapters = M.init_adapters(cfg, jax.random.key(1))
    # non-zero B, so the adapters' own gradients are not just B's
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora_b" in str(p[-1]) else x, adapters)
    return base_cfg, cfg, base, adapters


def _loss_cfg():
    c = default.get_config("tiny")
    return c.loss


def test_the_train_step_updates_only_the_adapters():
    base_cfg, cfg, base, adapters = _setup()
    tx = optim.make_optimizer(default.get_config("tiny").optim, 10)
    state = ts.init_train_state(adapters, tx)
    # Adam's moments exist only for the adapters
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert moments and sum(x.size for x in moments) == 2 * lora.num_params(adapters)
    roll = jax.tree.map(jnp.copy, lora.merge(lora.combine(base, adapters), cfg)[0])
    step = jax.jit(lambda s, b, r, f: ts.train_step(s, b, r, f, model_cfg=cfg,
                                                    loss_cfg=_loss_cfg(), tx=tx,
                                                    rollout_model_cfg=base_cfg))
    new, metrics = step(state, _batch(), roll, base)
    assert int(new.step) == 1 and float(metrics["train/grad_norm"]) > 0
    assert jax.tree.structure(new.params) == jax.tree.structure(adapters)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new.params),
                                                            jax.tree.leaves(adapters))]
    assert min(moved) > 0  # every adapter leaf moved (lr 1e-4 Adam: ~1e-4 each)
    with pytest.raises(ValueError, match="frozen"):
        ts.train_step(state, _batch(), roll, None, model_cfg=cfg, loss_cfg=_loss_cfg(), tx=tx)


def test_the_lora_train_step_sharded_equals_unsharded():
    base_cfg, cfg, base, adapters = _setup()
    tx = optim.make_optimizer(default.get_config("tiny").optim, 10)
    roll = lora.merge(lora.combine(base, adapters), cfg)[0]
    kw = dict(model_cfg=cfg, loss_cfg=_loss_cfg(), tx=tx, rollout_model_cfg=base_cfg)
    want, m_want = jax.jit(lambda s, b, r, f: ts.train_step(s, b, r, f, **kw))(
        ts.init_train_state(adapters, tx), _batch(), roll, base)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state_sh = ts.state_shardings(cfg, tx, mesh)
    base_sh = lora.split(M.param_shardings(cfg, mesh))[0]
    assert jax.tree.structure(state_sh.params) == jax.tree.structure(adapters)
    with jax.set_mesh(mesh):
        state = ts.init_train_state(jax.device_put(adapters, state_sh.params), tx, state_sh)
        got, m_got = jax.jit(lambda s, b, r, f: ts.train_step(s, b, r, f, mesh=mesh, **kw),
                             out_shardings=(state_sh, None))(
            state, _batch(), jax.device_put(roll, M.param_shardings(base_cfg, mesh)),
            jax.device_put(base, base_sh))
    np.testing.assert_allclose(m_got["loss/value"], m_want["loss/value"], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7),
                 got.params, want.params)


def _stacked_f32_copies(hlo: str, shapes) -> list:
    """HLO instructions producing a float32 array of a stacked base kernel's shape [L, ...]."""
    out = []
    for shape in shapes:
        dims = ",".join(map(str, shape))
        out += [line for line in hlo.splitlines() if f"= f32[{dims}]" in line]
    return out


def test_a_bf16_base_is_not_held_in_float32_by_the_cpu_step(monkeypatch):
    """transformer.loop_storage: XLA:CPU would convert the bf16 layer stack to float32 before
    slicing a layer and hoist that out of the layer loop (a float32 copy of the whole base);
    the uint16 bit patterns it passes instead give the same step bitwise."""
    base_cfg, cfg, base, adapters = _setup(num_layers=3, intermediate_size=48)
    base_cfg, cfg = (dataclasses.replace(c, param_dtype="bfloat16", dtype="bfloat16")
                     for c in (base_cfg, cfg))
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    tx = optim.make_optimizer(default.get_config("tiny").optim, 10)
    roll = lora.merge(lora.combine(base, adapters), cfg)[0]
    kw = dict(model_cfg=cfg, loss_cfg=_loss_cfg(), tx=tx, rollout_model_cfg=base_cfg)
    stacked = [x.shape for x in jax.tree.leaves(base["layers"]) if x.ndim >= 3]
    assert stacked and all(s[0] == 3 for s in stacked)

    def run():
        step = jax.jit(lambda s, b, r, f: ts.train_step(s, b, r, f, **kw))
        args = (ts.init_train_state(adapters, tx), _batch(), roll, base)
        return step(*args), step.lower(*args).compile().as_text()

    # the storage form itself: bf16 leaves of the stack as uint16, the rest as they were
    stored = M.loop_storage(base)
    assert all(x.dtype == jnp.uint16 for x in jax.tree.leaves(stored["layers"]))
    assert stored["embedding"] is base["embedding"]
    # ... and only inside the train step: the joined tree others use (export, scoring) holds
    # the weights themselves
    joined = ts.policy_params(adapters, base)
    assert {x.dtype for x in jax.tree.leaves(lora.split(joined)[0])} == {jnp.dtype(jnp.bfloat16)}
    (got, m_got), hlo = run()
    assert _stacked_f32_copies(hlo, stacked) == []
    assert "bitcast-convert" in hlo or "bitcast_convert" in hlo
    monkeypatch.setattr(M, "loop_storage", lambda params: params)  # the plain bf16 stack
    (want, m_want), hlo_plain = run()
    assert _stacked_f32_copies(hlo_plain, stacked)  # what loop_storage removes
    for k in m_want:
        np.testing.assert_array_equal(np.asarray(m_got[k]), np.asarray(m_want[k]), err_msg=k)
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)


def _run_stub(base_id):
    return types.SimpleNamespace(base_id=base_id)


def test_a_lora_checkpoint_restores_only_onto_its_base():
    mine = {"path": "/m/base", "sha256": "a" * 64}
    experiment.check_base(_run_stub(mine), dict(mine), "/w/checkpoints")
    experiment.check_base(_run_stub(None), None, "/w/checkpoints")  # no LoRA either side
    with pytest.raises(ValueError, match="trained on another base: model.hf_dir"):
        experiment.check_base(_run_stub(mine), {"path": "/m/base", "sha256": "b" * 64}, "/w/c")
    with pytest.raises(ValueError, match="holds full parameters, but this run trains LoRA"):
        experiment.check_base(_run_stub(mine), None, "/w/c")
    with pytest.raises(ValueError, match="holds LoRA adapters, but this run has no LoRA"):
        experiment.check_base(_run_stub(None), mine, "/w/c")


def test_the_base_identity_hashes_the_hf_dir_files(tmp_path):
    cfg = default.get_config("tiny_lora")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "README.md").write_text("not hashed")
    cfg.model.hf_dir = str(tmp_path)
    first = experiment.lora_base_id(cfg, None)
    (tmp_path / "README.md").write_text("changed")
    assert experiment.lora_base_id(cfg, None) == first
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    assert experiment.lora_base_id(cfg, None)["sha256"] != first["sha256"]
    cfg.model.hf_dir = ""  # a base built from the fields: its parameters' bytes
    a = experiment.lora_base_id(cfg, {"w": jnp.ones(3)})
    assert a != experiment.lora_base_id(cfg, {"w": jnp.ones(3).at[1].set(2.0)})


@pytest.mark.parametrize("field,value,needle", [
    ("model.lora.rank", -1, "model.lora.rank"),
    ("model.lora.rank", 0, r"model.lora.rank=0 turns LoRA off, but model.lora.targets"),
    ("model.lora.alpha", 0.0, "model.lora.alpha"),
    ("model.lora.targets", ("q_proj", "qkv_proj"), "unknown projections"),
    ("model.lora.init", "pissa", "model.lora.init"),
    ("model.lora.base_quant", "int4", "model.lora.base_quant"),
])
def test_lora_config_validation_names_the_field(field, value, needle):
    cfg = default.get_config("tiny_lora")
    cfg.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=needle):
        config_validation.validate(cfg)


def test_the_lora_presets_validate():
    for variant in ("lora", "tiny_lora"):
        config_validation.validate(default.get_config(variant))
    cfg = default.get_config("tiny_moe")  # the MLP targets adapt the experts
    cfg.model.lora.rank, cfg.model.lora.alpha = 4, 8.0
    cfg.model.lora.targets = ("q_proj", "down_proj")
    config_validation.validate(cfg)
    model_cfg = experiment.with_lora(cfg, experiment.model_config(cfg, 264))
    assert model_cfg.lora_targets == ("q_proj", "down_proj") and model_cfg.sparse_layers


@pytest.mark.slow
def test_a_tiny_lora_run_resumes_bitwise_and_checkpoints_only_adapters(tmp_path):
    """One run of 2 iterations against one stopped after its first checkpoint and resumed:
    the same adapters, bitwise; the checkpoints hold the adapters and the base's identity."""
    def cfg(iterations):
        # a warm start that answers some 1-digit additions (as test_train's resume test), so
        # rewards differ within groups and the adapters really move
        c = default.get_config("tiny_lora")
        c.task.difficulty, c.task.num_train, c.tokenizer.vocab_size = 1, 64, 270
        c.warmstart.steps, c.warmstart.batch_size, c.warmstart.learning_rate = 60, 32, 3e-3
        c.rollout.dynamic_sampling, c.rollout.group_size = True, 4
        c.train.iterations, c.eval.every, c.optim.learning_rate = iterations, 0, 1e-2
        c.warmstart.cache_dir = str(tmp_path / "cache")
        return c

    full, _ = loop.train(cfg(2), str(tmp_path / "full"))
    loop.train(cfg(1), str(tmp_path / "part"))
    resumed, _ = loop.train(cfg(2), str(tmp_path / "part"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.params),
                 jax.device_get(resumed.params))
    leaves = jax.tree_util.tree_leaves_with_path(full.params)
    assert leaves and all("lora" in str(p[-1]) for p, _ in leaves)
    b = [x for p, x in leaves if "lora_b" in str(p[-1])]
    assert max(float(jnp.max(jnp.abs(x))) for x in b) > 0  # RL moved B off zero
    from trustrl.infra import checkpoint as ckpt_lib
    ck = ckpt_lib.Checkpointer(str(tmp_path / "full"), 2)
    try:
        _, host = ck.restore(full)
    finally:
        ck.close()
    assert host["lora_base"]["path"] == "" and len(host["lora_base"]["sha256"]) == 64
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
               os.walk(tmp_path / "full" / "checkpoints" / "2") for f in fs)
    assert size < 400_000, size  # the adapters and their moments, not the base
