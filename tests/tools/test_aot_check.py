"""trustrl.tools.aot_check: per-chip memory of the run's compiled programs for a topology."""
import importlib.util
import subprocess
import sys

import pytest

from configs import default, qwen3_tpu
from trustrl.tools import aot_check

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _run(args, env):
    return subprocess.run([sys.executable, "-m", "trustrl.tools.aot_check", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def _tpu_env(subprocess_env):
    """The environment of an aot_check run for a TPU topology: libtpu's compile-only devices
    (one local worker), the JAX platform left to it, no persistent compilation cache, the
    libtpu of `make test` (TRUSTRL_LIBTPU_PATH) importable."""
    import os
    env = dict(subprocess_env, TPU_WORKER_HOSTNAMES="localhost")
    env.pop("JAX_PLATFORMS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the CPU tests' cache: not for TPU programs
    if LIBTPU_PATH:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [LIBTPU_PATH, env.get("PYTHONPATH")]))
    return env


def test_topology_and_model_resolution():
    # the TPU compiler's own limits (its RESOURCE_EXHAUSTED message), not the marketed HBM
    assert aot_check.parse_topology("v5p:2x4x4") == ("tpu", None, 95.74)
    assert aot_check.parse_topology("v5e:4x4") == ("tpu", None, 15.75)
    assert aot_check.parse_topology("v6e:4x8") == ("tpu", None, 31.25)
    assert aot_check.parse_topology("cpu:8") == ("cpu", 8, None)
    with pytest.raises(ValueError, match="not valid: use a TPU generation"):
        aot_check.parse_topology("v9:2x2")
    with pytest.raises(ValueError, match="not valid"):  # libtpu does not know this name
        aot_check.parse_topology("v5litepod:2x2")
    cfg = qwen3_tpu.get_config()  # hf_dir /mnt/models/Qwen3-8B-Base is absent here
    hf, source = aot_check.model_hf_config(cfg, None)
    assert source == "preset qwen3-8b" and hf["hidden_size"] == 4096
    assert aot_check.model_hf_config(cfg, "qwen3-32b")[0]["num_hidden_layers"] == 64
    with pytest.raises(ValueError, match="not a preset; choose one of"):
        aot_check.model_hf_config(cfg, "gpt5")
    tiny = default.get_config("tiny")
    hf, source = aot_check.model_hf_config(tiny, None)
    assert source == "config" and hf["vocab_size"] == tiny.tokenizer.vocab_size
    # the presets are valid HF configs of the shape they name (8.2B parameters for 8B)
    from trustrl.model import hf as hf_lib
    from trustrl.model import transformer as model_lib
    import jax
    import numpy as np
    shapes = model_lib.param_shapes(hf_lib.config_from_hf(aot_check.MODELS["qwen3-8b"]))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert 8.1e9 < n < 8.3e9, n


@pytest.mark.slow
def test_cpu_topology_tiny_config_and_the_fit_verdict(subprocess_env):
    done = _run(["--config=configs/default.py:tiny", "--topology=cpu:8"], subprocess_env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if " | " in line]
    assert [line.split()[0] for line in table] == ["phase", "init", "rollout", "score", "train",
                                                   "eval", "eval_k"]
    for line in table[1:]:
        peak = float(line.split("|")[6])
        assert 0 < peak < 1, line  # a tiny model: well under 1 GiB per device
    assert "attention 'auto' -> 'blockwise' on cpu" in done.stdout  # 512 + 4 columns on CPU
    assert "whole iteration: peak" in done.stdout
    # fewer sampler rows than the iteration has: the continuous-batching program is compiled
    done = _run(["--config=configs/default.py:tiny", "--topology=cpu:8", "--phases=rollout",
                 "--config.rollout.max_rows=2"], subprocess_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 rows through 2 continuous slots" in done.stdout
    # a limit nothing fits in: exit 1 naming the phases (the same verdict as report())
    done = _run(["--config=configs/default.py:tiny", "--topology=cpu:8", "--hbm_gib=1e-6",
                 "--phases=init"], subprocess_env)
    assert done.returncode == 1
    assert "init do(es) not fit in 1e-06 GiB per chip" in done.stderr


def test_report_verdict():
    rows = [dict(phase="init", shape="s", args=1.0, temp=0.0, total=3.8, compile_s=1.0),
            dict(phase="train", shape="s", args=2.9, temp=24.6, total=27.5, compile_s=86.0,
                 held={"cache": 60.0, "batch": 1.0}),
            dict(phase="rollout", shape="s", args=float("nan"), temp=313.2, total=float("inf"),
                 compile_s=57.0, refused="Ran out of memory on HBM")]
    table, verdict = aot_check.report(rows, 95.74)
    assert [line.split("|")[8].strip() for line in table.splitlines()[2:5]] == ["yes", "yes",
                                                                               "NO"]
    assert verdict.startswith("aot_check: rollout do(es) not fit in 95.74 GiB per chip")
    assert aot_check.report(rows[:1], 3.0)[1].startswith("aot_check: init do(es) not fit")
    assert aot_check.report(rows[:2], None)[1] is None  # no limit (cpu:N): no verdict
    # the program fits alone (27.5) but not with what the run holds beside it (+ 61)
    assert aot_check.report(rows[:2], 80.0)[1].startswith("aot_check: train do(es) not fit")
    assert "held during train: cache 60, batch 1" in table


@pytest.mark.parametrize("args,needle", [
    (["--topology=v9:1x1"], "is not valid: use a TPU generation"),
    (["--topology=cpu:8", "--phases=init,sampler"], "--phases: unknown ['sampler']"),
    (["--topology=cpu:8", "--obs_len=0"], "--obs_len must be >= 1"),
    (["--topology=cpu:8", "--config.rollout.max_rows=3"], "rollout.max_rows=3 is not divisible"),
])
def test_bad_flags_exit_2(args, needle, subprocess_env):
    done = _run(["--config=configs/default.py:tiny", *args], subprocess_env)
    assert done.returncode == 2 and needle in done.stderr, done.stderr[-2000:]


def test_held_memory_against_a_hand_count():
    # tiny config, every parameter replicated (data=8): the run keeps the train state during
    # sampling, the rollout sampler's KV cache and the iteration's batch during the train step
    import jax
    import numpy as np
    from trustrl.model import transformer as model_lib
    cfg = default.get_config("tiny")
    cfg.mesh = dict(data=8, fsdp=1, tensor=1)
    cfg.rollout.prompts_per_iter, cfg.rollout.group_size = 8, 2  # 16 rows: 2 per device
    hf, _ = aot_check.model_hf_config(cfg, None)
    assert not cfg.rollout.keep_kv_cache  # the default: freed after each rollout, not held
    held = aot_check.check(cfg, jax.devices()[:8], hf_config=hf, prompt_len=16,
                           phases=("train",), log=lambda *_: None)[0]["held"]
    assert set(held) == {"iteration's batch", "rollout record's prompts"}
    cfg.rollout.keep_kv_cache = True
    rows = aot_check.check(cfg, jax.devices()[:8], hf_config=hf, prompt_len=16,
                           phases=("rollout", "train"), log=lambda *_: None)
    held = {r["phase"]: r["held"] for r in rows}
    from trustrl.model import hf as hf_lib
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model_lib.param_shapes(
        hf_lib.config_from_hf(hf))))
    gib = 2 ** 30
    # params + Adam mu + nu in fp32, and 4 int32 scalars: step, skipped, Adam's count and the
    # learning-rate schedule's count
    assert held["rollout"]["train state"] * gib == 3 * 4 * n_params + 4 * 4
    m, s = cfg.model, 16 + cfg.rollout.max_new_tokens
    cache = m.num_layers * 2 * (2 * m.num_kv_heads * s * m.head_dim * 2) + 2 * s + 4  # bf16 k / v
    assert held["train"]["rollout sampler's KV cache"] * gib == cache
    n, t = cfg.rollout.max_new_tokens, 16 + cfg.rollout.max_new_tokens
    # tokens / valid / positions [t], response tokens / mask / mu / pi_old (score pass) [n],
    # the advantage, and the Rollout's prompt tokens / mask [16] and finish / group index: int32
    # or float32, 2 rows per device
    assert cfg.train.score_pass
    assert held["train"]["iteration's batch"] * gib == 2 * 4 * (3 * t + 4 * n + 1)
    assert held["train"]["rollout record's prompts"] * gib == 2 * 4 * (2 * 16 + 2)
    for r in rows:
        assert r["peak"] == r["total"] + sum(r["held"].values()) > r["total"] > 0


def test_lora_run_trains_adapters_beside_a_held_frozen_base():
    # tiny_lora (r 4 on every projection, fp32 base), every parameter replicated: the train
    # state is the adapters and their moments; the frozen base is held during init and is an
    # argument of the merge and the train step (which compiles with it)
    import jax
    import numpy as np
    from trustrl.model import hf as hf_lib, lora
    from trustrl.model import transformer as model_lib
    from trustrl.training import experiment
    cfg = default.get_config("tiny_lora")
    cfg.mesh = dict(data=8, fsdp=1, tensor=1)
    cfg.rollout.prompts_per_iter, cfg.rollout.group_size = 8, 2
    hf, _ = aot_check.model_hf_config(cfg, None)
    lines = []
    rows = {r["phase"]: r for r in aot_check.check(
        cfg, jax.devices()[:8], hf_config=hf, prompt_len=16, phases=("init", "merge", "train"),
        log=lines.append)}
    assert list(rows) == ["init", "merge", "train"]
    assert "LoRA r 4 alpha 8 on 7 projection(s)" in lines[0] and "frozen base float32" in lines[0]
    model_cfg = experiment.with_lora(cfg, hf_lib.config_from_hf(hf))
    base, adapters = (lora.num_params(t) for t in lora.split(model_lib.param_shapes(model_cfg)))
    gib = 2 ** 30
    assert rows["init"]["held"] == {"frozen base": 4 * base / gib}
    assert rows["init"]["args"] * gib == 4 * adapters  # only the adapters are trained
    assert rows["merge"]["args"] * gib == 4 * (base + adapters)
    assert rows["merge"]["held"] == {"optimizer state": 4 * (2 * adapters + 2) / gib}
    assert rows["train"]["args"] * gib > 4 * (base + 3 * adapters)  # + the batch
    assert np.isfinite(rows["train"]["total"])


LIBTPU_PATH = __import__("os").environ.get("TRUSTRL_LIBTPU_PATH", "")


@pytest.mark.skipif(not (HAS_LIBTPU or LIBTPU_PATH), reason="libtpu is not installed (`make "
                    "test` installs libtpu==0.0.42.1, the libtpu of jax 0.10.2, into "
                    ".venv/libtpu and sets TRUSTRL_LIBTPU_PATH)")
def test_tpu_topology_compiles_every_phase_with_splash(subprocess_env):
    """What the pod runs, compiled for a TPU topology from this CPU host: "auto" is splash there,
    in a shard_map (rows over data, heads over tensor); every phase lowers and fits. Before
    issue 25 this compiled blockwise attention (the host's backend), and with splash it failed:
    'Mosaic kernels cannot be automatically partitioned'."""
    env = _tpu_env(subprocess_env)
    done = _run(["--config=configs/default.py:tiny", "--topology=v5p:2x2x2",
                 "--config.rollout.max_rows=4"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(8 chips, TPU v5" in done.stdout
    assert "attention 'auto' -> 'splash' on tpu" in done.stdout
    assert "8 rows through 4 continuous slots" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.split(" ")[0] in aot_check.PHASES
            + ("eval_k",) and " | " in line]
    assert [r.split()[0] for r in rows] == ["init", "rollout", "score", "train", "eval", "eval_k"]
    assert all(" yes " in line for line in rows), rows


@pytest.mark.skipif(not (HAS_LIBTPU or LIBTPU_PATH), reason="libtpu is not installed (`make "
                    "test` installs it into .venv/libtpu and sets TRUSTRL_LIBTPU_PATH)")
@pytest.mark.parametrize("method", ["m2po", "cppo", "minpro_clip"])
def test_tpu_topology_compiles_the_sequence_level_losses(method, subprocess_env):
    """The train step of the losses that are not elementwise, compiled for a TPU topology with
    the minibatch sharded over the chips: m2po's batch-level bisection (a fori_loop of sums
    over every shard), cppo's prefix sums and clipped quantile (a lax.cond around a sort),
    minpro_clip's prefix minimum (associative scans along the row); ~11 s each."""
    done = _run(["--config=configs/default.py:tiny", "--topology=v5p:2x2x2", "--phases=train",
                 f"--config.loss.method={method}"], _tpu_env(subprocess_env))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(8 chips, TPU v5" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("train") and
            " | " in line]
    assert len(rows) == 1 and " yes " in rows[0], rows


@pytest.mark.skipif(not (HAS_LIBTPU or LIBTPU_PATH), reason="libtpu is not installed (`make "
                    "test` installs it into .venv/libtpu and sets TRUSTRL_LIBTPU_PATH)")
def test_tpu_topology_compiles_the_multi_turn_programs(subprocess_env):
    """An environment run's rollout for a TPU topology from this CPU host: the multi-turn
    sampler's prefill, decode loop and observation append (row-indexed KV-cache writes, a
    scatter) lower on the mesh and compile with libtpu (about 8 s on the 2-core VM)."""
    env = _tpu_env(subprocess_env)
    done = _run(["--config=configs/environments.py:tiny", "--topology=v5p:2x2x2",
                 "--prompt_len=16", "--phases=rollout", "--obs_len=300",
                 "--config.env.id=game:Sudoku-v0-easy"], env)  # never made: no GEM import
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(8 chips, TPU v5" in done.stdout
    # 8 episodes in 8 rows, trajectories of max_total_tokens, chunks capped at it
    assert ("8 episodes (env.id 'game:Sudoku-v0-easy': multi-turn, 2 turns of <= 4 tokens, 8 "
            "rows at a time, observation chunks of 32 tokens (--obs_len=300)) of 16 + 32 "
            "tokens") in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("rollout") and
            " | " in line]
    assert [r.split()[0] for r in rows] == ["rollout:prefill", "rollout:loop", "rollout:append"]
    assert all(" yes " in line for line in rows), rows


def test_multi_turn_sampler_lowers_its_programs_on_the_mesh():
    """What aot_check compiles for an environment run (env.id): the multi-turn sampler's
    prefill, decode loop and observation append on abstract arguments, max_rows rows, the loop
    state donated and laid out like the single-turn sampler's (rows over data x fsdp, the KV
    cache's kv heads over tensor)."""
    import jax
    from configs import environments
    from trustrl.infra import sharding
    from trustrl.model import hf as hf_lib, policy, transformer as model_lib
    from trustrl.rollout import multiturn
    from trustrl.rollout.sampler import SamplerConfig
    cfg = environments.get_config("tiny")  # mesh data 2 x tensor 4
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:8])
    hf, _ = aot_check.model_hf_config(cfg, None)
    roll_cfg = policy.rollout_config(hf_lib.config_from_hf(hf), "bfloat16", "")
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          model_lib.param_shapes(roll_cfg),
                          model_lib.param_shardings(roll_cfg, mesh))
    mts = multiturn.MultiTurnSampler(policy.decode_model(roll_cfg),
                                     SamplerConfig(max_new_tokens=32, max_rows=4),
                                     multiturn.MultiTurnConfig(max_total_tokens=32))
    with jax.set_mesh(mesh):
        progs = mts.lower(params, 8, 16, 5, sharding.batch_sharding(mesh))
    assert [(name, what) for name, what, _ in progs] == [  # + the round region, 16 columns
        ("prefill", "4 rows x 16 into a 16 + 32 + 16 cache"),  # max_rows=4 of the 8 episodes
        ("loop", "4 rows x (16 + 32 + 16) tokens, <= 4 turns"),
        ("append", "4 rows x 8 tokens onto the 16 + 32 + 16 cache")]  # min_obs_bucket 8
    state = progs[1][2].args_info[0][1]
    assert state.cache.k[0].shape == (4, roll_cfg.num_kv_heads, 64, roll_cfg.head_dim)
    assert state.cache.index.shape == ()  # the loop writes at one shared column
    assert state.cols.shape == (4,)  # each row's own next column (row-indexed)
    assert state.cache.k[0].donated and state.tokens.donated
    layout = progs[1][2].compile().input_shardings[0][1]
    assert layout.cache.k[0].spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor",
                                                                 None, None)
    assert layout.tokens.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)


# --- mixture of experts (issue 28) --------------------------------------------------------------

def test_moe_presets_are_qwen3_30b_a3b_and_a_small_one():
    import jax
    import numpy as np
    from trustrl.model import hf as hf_lib
    from trustrl.model import transformer as model_lib
    from trustrl.training import experiment
    from configs import qwen3_moe
    big = hf_lib.config_from_hf(aot_check.MODELS["qwen3-30b-a3b"])
    assert (big.family, big.num_layers, big.hidden_size, big.num_heads, big.num_kv_heads,
            big.head_dim, big.num_experts, big.num_experts_per_tok, big.moe_intermediate_size,
            big.vocab_size, big.norm_topk_prob, big.tie_word_embeddings) == (
        "qwen3_moe", 48, 2048, 32, 4, 128, 128, 8, 768, 151936, True, False)
    assert big.sparse_layers == tuple(range(48)) and big.scan_layers
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model_lib.param_shapes(big)))
    idle = 48 * 3 * 2048 * 768 * (128 - 8)  # the experts a token is not routed to
    assert 30.4e9 < n < 30.6e9 and 3.3e9 < n - idle < 3.4e9, n  # "30.5B, 3.3B activated"
    small = hf_lib.config_from_hf(aot_check.MODELS["qwen3-moe-small"])
    assert small.family == "qwen3_moe" and small.num_experts_per_tok < small.num_experts
    # the Table 1 presets' model dirs name the preset (their config.json is absent here)
    for run in ("base", "base_r3", "thinking"):
        hf, source = aot_check.model_hf_config(qwen3_moe.get_config(run), None)
        assert source == "preset qwen3-30b-a3b" and hf["num_experts"] == 128
    assert aot_check.model_hf_config(qwen3_moe.get_config("dense_base"), None)[1] == (
        "preset qwen3-8b")
    # a MoE built from the config's fields: the model the run builds (experiment.model_config)
    for overrides in ({}, {"mlp_only_layers": (0,)}):
        cfg = default.get_config("tiny_moe")
        cfg.model.update(overrides)
        hf, source = aot_check.model_hf_config(cfg, None)
        assert source == "config" and hf["architectures"] == ["Qwen3MoeForCausalLM"]
        built = experiment.model_config(cfg, cfg.tokenizer.vocab_size)
        compiled = experiment.with_run_fields(cfg, hf_lib.config_from_hf(
            hf, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype, remat=cfg.model.remat))
        assert compiled == built, (compiled, built)  # what check() compiles


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_LIBTPU or LIBTPU_PATH), reason="libtpu is not installed (`make "
                    "test` installs it into .venv/libtpu and sets TRUSTRL_LIBTPU_PATH)")
def test_tpu_topology_compiles_the_small_moe_preset_with_routing_replay(subprocess_env):
    """The small MoE preset on a tiny v5p slice (mesh data 2 x tensor 4), with routing replay:
    every phase lowers and fits (about 150 s on the 2-core VM)."""
    env = _tpu_env(subprocess_env)
    done = _run(["--config=configs/default.py:tiny_moe", "--model=qwen3-moe-small",
                 "--topology=v5p:2x2x2", "--prompt_len=16", "--config.rollout.max_rows=4",
                 "--config.eval.every=0", "--config.model.routing_replay=True"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(8 chips, TPU v5" in done.stdout and "model from preset qwen3-moe-small" in done.stdout
    assert "routed experts recorded (replayed)" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.split(" ")[0] in aot_check.PHASES
            and " | " in line]
    assert [r.split()[0] for r in rows] == ["init", "rollout", "score", "routing", "train"]
    assert all(" yes " in line for line in rows), rows


def test_the_routing_metrics_program_is_compiled_for_a_moe_run_only():
    """The per-iteration routing metrics (loop.routing_program) are a phase of a mixture of
    experts whose rollout records its experts, held like the score pass; a dense run has none."""
    import jax
    cfg = default.get_config("tiny_moe")
    cfg.mesh = dict(data=2, fsdp=2, tensor=2)
    cfg.rollout.prompts_per_iter, cfg.rollout.group_size = 4, 2
    hf, _ = aot_check.model_hf_config(cfg, None)
    rows = aot_check.check(cfg, jax.devices()[:8], hf_config=hf, prompt_len=16,
                           phases=("score", "routing"), log=lambda *_: None)
    assert [r["phase"] for r in rows] == ["score", "routing"]
    routing = rows[1]
    assert routing["shape"] == rows[0]["shape"] and routing["total"] > 0  # the score pass's rows
    # held as in the score pass, but the recorded experts are the program's own argument
    assert set(routing["held"]) == set(rows[0]["held"]) - {"rollout record's routed experts"}
    assert "rollout record's routed experts" in rows[0]["held"]
    dense = default.get_config("tiny")
    dense.mesh = dict(data=8, fsdp=1, tensor=1)
    hf, _ = aot_check.model_hf_config(dense, None)
    assert [r["phase"] for r in aot_check.check(dense, jax.devices()[:8], hf_config=hf,
                                                 prompt_len=16, phases=("score", "routing"),
                                                 log=lambda *_: None)] == ["score"]


# --- reward models (issue 31) -------------------------------------------------------------------

def test_reward_phase_and_its_params_held_through_the_run():
    """A run with a reward model: its scoring pass is compiled on the run's mesh (calls of
    reward_model.batch_size rows, rounded up to the data shards, at max_length rounded up to
    the bucket) and its params are held during every other phase; the report says whether the
    largest policy phase fits beside them. The presets: Skywork-Reward-Llama-3.1-8B's shape."""
    import jax
    import ml_collections
    import numpy as np
    from trustrl.model import reward_model
    from trustrl.model import transformer as model_lib
    big = reward_model.config_from_hf(aot_check.REWARD_MODELS["llama3.1-8b"])
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(reward_model.param_shapes(big)))
    assert 7.5e9 < n < 7.6e9 and big.model.rope_scaling.factor == 8.0, n  # 8B less lm_head
    cfg = default.get_config("tiny")
    cfg.mesh = dict(data=8, fsdp=1, tensor=1)  # everything replicated: a hand count
    cfg.rollout.prompts_per_iter, cfg.rollout.group_size = 8, 2  # 16 rows
    cfg.reward_model = ml_collections.ConfigDict(dict(hf_dir="/nowhere/Skywork-Reward-Llama-"
                                                      "3.1-8B-v0.2", dtype="bfloat16",
                                                      max_length=40, bucket=16, batch_size=4))
    assert aot_check.reward_hf_config(cfg, None) == (aot_check.REWARD_MODELS[
        "skywork-reward-llama-3.1-8b"], "preset skywork-reward-llama-3.1-8b")
    rm_hf = dict(aot_check.REWARD_MODELS["llama3.1-8b"], vocab_size=300, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    hf, _ = aot_check.model_hf_config(cfg, None)
    lines = []
    rows = {r["phase"]: r for r in aot_check.check(
        cfg, jax.devices()[:8], hf_config=hf, prompt_len=16, phases=("reward", "train"),
        log=lines.append, reward_config=rm_hf)}
    assert list(rows) == ["reward", "train"]
    assumed = next(line for line in lines if "assumed: reward model" in line)
    assert "4 scoring call(s) per iteration of 8 rows x 48 tokens" in assumed  # 4 -> 8 rows
    tiny = reward_model.config_from_hf(rm_hf)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model_lib.param_shapes(
        tiny.model))) + 64
    gib = 2 ** 30
    assert rows["reward"]["reward_model_params"] * gib == 2 * params  # bf16, replicated
    assert rows["reward"]["args"] * gib == 2 * params + 48 * (4 + 4 + 1)  # + 1 row per chip
    assert rows["train"]["held"]["reward model params"] == rows["reward"]["reward_model_params"]
    assert "reward model params" not in rows["reward"]["held"]
    assert "train state" in rows["reward"]["held"]
    table, verdict = aot_check.report(list(rows.values()), 1.0)
    assert verdict is None
    assert f"reward model: {2 * params / gib:.4g} GiB of params per chip" in table
    assert "beside the largest policy phase (train: " in table and "of 1: fits" in table
    assert aot_check.report(list(rows.values()), 1e-6)[1].startswith(
        "aot_check: reward, train do(es) not fit")


@pytest.mark.skipif(not (HAS_LIBTPU or LIBTPU_PATH), reason="libtpu is not installed (`make "
                    "test` installs it into .venv/libtpu and sets TRUSTRL_LIBTPU_PATH)")
def test_tpu_topology_compiles_an_async_split_layout(subprocess_env):
    """train.mode=async on v5p 2x2x2 (2 hosts): 2 chips of each host sample as one replica per
    host (data 2, 2 of the 4 prompts each), the other 4 train (tensor 4); each side's programs
    compile with splash on its own chips and fit. The sampler holds the next rollout
    parameters (a sync arriving) and no train state; the trainer holds no KV cache. One
    sampler mesh across the 2 hosts is refused in async (exit 2, naming the field)."""
    env = _tpu_env(subprocess_env)
    flags = ["--config=configs/default.py:tiny", "--topology=v5p:2x2x2", "--config.mesh.data=1",
             "--config.sampler_mesh.devices=4", "--config.train.mode=async",
             "--config.rollout.max_rows=4", "--config.train.rollout_version=scheduled"]
    done = _run([*flags, "--config.sampler_mesh.replicas=2"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("sampler: 2 chips, mesh {'data': -1, 'fsdp': 1, 'tensor': 1} (replica 1 of 2, 2 "
            "prompts each)") in done.stdout
    assert "trainer: 4 chips, mesh {'data': 1, 'fsdp': 1, 'tensor': 4}" in done.stdout
    assert "attention 'auto' -> 'splash' on tpu" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith(("sampler:", "trainer:"))
            and " | " in line]
    assert [r.split()[0] for r in rows] == ["sampler:rollout", "trainer:init", "trainer:score",
                                            "trainer:train", "trainer:eval", "trainer:eval_k"]
    assert all(" yes " in line for line in rows), rows
    held = [line for line in done.stdout.splitlines() if line.strip().startswith("held during")]
    sampler_held = [h for h in held if "sampler:rollout" in h]
    assert sampler_held and "next rollout params" in sampler_held[0]
    assert "train state" not in sampler_held[0]
    assert not any("KV cache" in h for h in held if "trainer:" in h)
    done = _run(flags, env)
    assert done.returncode == 2 and "sampler_mesh.replicas=1 must be a multiple of 2" in \
        done.stderr, done.stderr[-3000:]
