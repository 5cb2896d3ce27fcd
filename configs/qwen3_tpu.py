r"""Qwen3-8B-Base with DPPO-Binary-TV on DAPO-Math-17k, laid out for a TPU v5p-64 pod slice.

Documented, not run in this repository (no TPU here). Follows the paper's scaling runs
(sec. 5, Table 1): lr 1e-6, delta 0.2 (TV), IS cap C = 5, 256 prompts x 16 samples, bf16
training and bf16 rollout. Eval: the held-out split of the training set (an AIME eval
needs a second task, not wired in yet).

Layout: 32 chips (v5p-64 = 32 chips, 64 cores); mesh data=1, fsdp=8, tensor=4. Parameters and
optimizer state are FSDP-sharded over 8, attention heads / MLP / vocabulary over 4 (the exact
full-vocabulary divergence then reduces over the 4-way tensor axis). Per-chip memory of every
phase (rollout, score pass, train step, evaluation, and what stays on the chip between them),
compiled for v5p 2x4x4 from a CPU machine with the kernels the pod runs (python -m
trustrl.tools.aot_check --config=configs/qwen3_tpu.py --topology=v5p:2x4x4): the table is
docs/pod_memory.md (benchmarks/pod_memory.py). Launch on every worker:

    bash launch/tpu_pod.sh NAME ZONE configs/qwen3_tpu.py gs://BUCKET/runs/qwen3_8b_dppo

`configs/qwen3_tpu.py:async`: the same run with train.mode="async" on a split layout of the
same 32 chips (16 sample, 16 train; docs/async_rl.md has its aot_check table and the predicted
speed-up).

Before launching: put the HF checkpoint (config.json + safetensors) and the DAPO parquet on
every worker's local disk (or a mounted bucket) and set model.hf_dir / task.manual_dir.
"""
import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "async"):
        raise ValueError(f"unknown variant {arg!r}; valid: '' (sync), 'async'")
    c = default.get_config("default")
    c.mesh = dict(data=1, fsdp=8, tensor=4)
    c.model.hf_dir = "/mnt/models/Qwen3-8B-Base"
    c.model.param_dtype = "float32"  # master weights
    c.model.dtype = "bfloat16"  # the paper trains in bf16
    c.model.remat = True
    c.tokenizer.path = ""
    c.task.name = "dapo_math"
    c.task.manual_dir = "/mnt/data/dapo-math-17k"
    c.task.template = "chat"
    c.warmstart.steps = 0
    c.rollout.prompts_per_iter = 256
    c.rollout.group_size = 16
    c.rollout.max_new_tokens = 16384
    c.rollout.dtype = "bfloat16"
    c.rollout.max_rows = 512  # 512 continuous decode slots (4,096 rows at once do not fit)
    c.loss.method = "dppo_binary_tv"
    c.loss.delta_low = c.loss.delta_high = 0.2
    c.loss.is_cap = 5.0
    c.loss.agg = "token-mean"
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.1
    c.train.iterations = 300
    c.train.minibatches = 4
    c.train.microbatches = 64  # 16 of the 1,024 rows per micro-batch (2 per chip)
    c.eval.every = 25
    c.eval.num_prompts = 256  # held-out prompts
    c.eval.k = 32  # avg@32 / pass@32
    c.checkpoint.every = 10
    c.checkpoint.max_to_keep = 3
    if arg == "async":  # half the slice samples while the other half trains (issue 33)
        # 2 chips of each of the 8 hosts: one sampler replica of 2 tensor-parallel chips per
        # host (async with several processes needs a replica per process and scheduled
        # versions: docs/async_rl.md)
        c.sampler_mesh = dict(devices=16.0, data=1, fsdp=1, tensor=2, replicas=8)
        c.mesh = dict(data=1, fsdp=4, tensor=4)  # the trainer, on the other 16 chips
        c.train.mode = "async"
        c.train.max_staleness = 1
        c.train.rollout_version = "scheduled"
        c.train.partial_rollouts = 2048
        # per replica: 8 x 32 slots decode at once, the sync layout's KV cache per chip on half
        # the chips (its 256 slots over data 4 x tensor 4; here over tensor 2)
        c.rollout.max_rows = 32
        c.train.microbatches = 128  # 2 rows per chip per micro-batch, as on 32 chips
    return c
