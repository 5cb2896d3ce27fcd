r"""The paper's scaling runs (Table 1, sec. 5 / App. E) as pod presets: Qwen3-30B-A3B mixture of
experts (with and without rollout routing replay, R3), its thinking variant and the dense
Qwen3-8B-Base, on DAPO-Math. ``--config=configs/qwen3_moe.py:RUN[,METHOD]``.

Documented, not run in this repository (no TPU here); docs/moe.md has the per-chip memory of
every phase of ``base`` on its slice, compiled from a CPU machine with
``python -m trustrl.tools.aot_check`` (command and date there).

RUN (Table 1's columns; every run: rollout temperature 1.0, IS cap C = 5, bf16 training with
fp32 master weights, bf16 rollout, the router in fp32, prompts up to 1,024 tokens):

    run         model                 response  prompts x group  mini-batch  lr    steps
    base        Qwen3-30B-A3B-Base    16,384    256 x 16         32 prompts  1e-6  200
    base_r3     base + routing replay 16,384    256 x 16         32 prompts  1e-6  200
    thinking    Qwen3-30B-A3B         16,384    256 x 16         32 prompts  1e-6  250
    dense_base  Qwen3-8B-Base          8,000    128 x 8          32 prompts  1e-6  1,300
    base_lora   Qwen3-30B-A3B-Base + LoRA r 32, alpha 64  8,000  128 x 8  16 prompts  1e-5  900
                (delta TV 0.15)

METHOD: ``tv`` (default) DPPO-Binary-TV, delta 0.2 (0.15 for base_lora); ``kl`` DPPO-Binary-KL,
delta 0.05; ``grpo_clip_higher`` the paper's baseline here, PPO clip eps 0.2 / 0.27. The
mini-batch of 32 prompts is train.minibatches = prompts / 32 optimizer steps per iteration.

Not from the paper: the model and data paths below (set them), the mesh (MoE: v5p-64, 32 chips,
data 1 x fsdp 8 x tensor 4, which aot_check found to fit; smaller slices not tried),
train.microbatches / score parts / rollout.max_rows (memory only: exact accumulation, same
rollouts) and the evaluation, which reads the held-out split of the training set: 32 prompts
x 32 samples (the size of AIME avg@32) every 5 steps (MoE) / 10 (dense), at the rollout
temperature (the paper: AIME24/25 at T 0.7, top_p 0.95).
Loss aggregation token-mean and group-mean advantages as configs/qwen3_tpu.py (the authors'
verl example used seq-mean-token-sum-norm). Launch on every worker:

    bash launch/tpu_pod.sh NAME ZONE configs/qwen3_moe.py:base gs://BUCKET/runs/moe_base

Before launching: put the HF checkpoint (config.json + safetensors) and the DAPO parquet on
every worker's local disk (or a mounted bucket) and set model.hf_dir / task.manual_dir.
"""
import ml_collections

from configs import default

# run -> (model dir, routing replay, prompts per step, group size, mini-batch prompts,
#         max response tokens, learning rate, iterations, TV delta)
RUNS = {
    "base": ("/mnt/models/Qwen3-30B-A3B-Base", False, 256, 16, 32, 16384, 1e-6, 200, 0.2),
    "base_r3": ("/mnt/models/Qwen3-30B-A3B-Base", True, 256, 16, 32, 16384, 1e-6, 200, 0.2),
    "thinking": ("/mnt/models/Qwen3-30B-A3B", False, 256, 16, 32, 16384, 1e-6, 250, 0.2),
    "dense_base": ("/mnt/models/Qwen3-8B-Base", False, 128, 8, 32, 8000, 1e-6, 1300, 0.2),
}
# Table 1's fifth column: LoRA r 32, alpha 64 on the frozen bf16 base (docs/lora.md). The
# paper does not say which projections; these are verl's default ("all-linear"): every
# attention projection and every expert's gate / up / down (one adapter per expert, 1.7B
# adapter parameters at r 32 over the 48 layers x 128 experts).
RUNS["base_lora"] = ("/mnt/models/Qwen3-30B-A3B-Base", False, 128, 8, 16, 8000, 1e-5, 900, 0.15)
LORA = dict(rank=32, alpha=64.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"))
# method -> (loss.method, delta_low, delta_high); the IS cap is 5 for every method (Table 1)
METHODS = {"tv": None, "kl": ("dppo_binary_kl", 0.05, 0.05),
           "grpo_clip_higher": ("ppo_clip", 0.2, 0.27)}
IS_CAP = 5.0
MOE_MESH = dict(data=1, fsdp=8, tensor=4)  # v5p-64 (2x4x4, 32 chips): docs/moe.md
DENSE_MESH = dict(data=1, fsdp=8, tensor=4)  # as configs/qwen3_tpu.py


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "RUN" or "RUN,METHOD" (RUNS x METHODS)."""
    run, _, method = (arg or "base").partition(",")
    if run not in RUNS:
        raise ValueError(f"unknown run {run!r}; valid: {sorted(RUNS)}")
    method = method or "tv"
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {sorted(METHODS)}")
    hf_dir, replay, prompts, group, mini, response, lr, iterations, tv = RUNS[run]
    moe = run != "dense_base"

    c = default.get_config("default")
    c.mesh = dict(MOE_MESH if moe else DENSE_MESH)
    c.model.hf_dir = hf_dir
    c.model.param_dtype = "float32"  # master weights
    c.model.dtype = "bfloat16"  # the paper trains in bf16 (the router computes in fp32)
    c.model.remat = True
    c.model.routing_replay = replay
    c.tokenizer.path = ""
    c.task.name = "dapo_math"
    c.task.manual_dir = "/mnt/data/dapo-math-17k"
    c.task.template = "chat"
    c.warmstart.steps = 0
    c.rollout.prompts_per_iter = prompts
    c.rollout.group_size = group
    c.rollout.max_new_tokens = response
    c.rollout.temperature = 1.0
    c.rollout.dtype = "bfloat16"
    # continuous decode slots (all rows at once do not fit; for the MoE 512 slots compiled to
    # 98.8 GiB of temporaries per chip on v5p-64, 256 to 78.4 GiB with the train state: docs/moe.md)
    c.rollout.max_rows = 256 if moe else 512
    c.loss.method, c.loss.delta_low, c.loss.delta_high = METHODS[method] or (
        "dppo_binary_tv", tv, tv)
    c.loss.is_cap = IS_CAP
    c.loss.agg = "token-mean"
    c.optim.learning_rate = lr
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.1
    c.train.iterations = iterations
    if run == "base_lora":  # adapters in float32 (the optimizer's), the frozen base in bf16
        c.model.lora.update(LORA)
        c.model.param_dtype = "bfloat16"
    c.train.minibatches = prompts // mini  # a mini-batch of `mini` prompts per optimizer step
    # MoE: 8 rows per micro-batch (1 per data x fsdp shard) of 1,024 + 16,384 tokens (16 rows
    # did not fit v5p-64: 100.1 GiB per chip, docs/moe.md) and 16 rows per score part; dense:
    # 32 rows (4 per shard) of 1,024 + 8,000 tokens, about the 8B train step configs/qwen3_tpu.py
    # measured (2 rows per shard of 512 + 16,384: docs/pod_memory.md)
    c.train.microbatches = mini * group // (8 if moe else 32)
    c.train.score_microbatches = prompts * group // 16 if moe else 0
    c.eval.every = 5 if moe else 10
    c.eval.num_prompts = 32  # held-out prompts (AIME's size), avg@32 / pass@32
    c.eval.k = 32
    c.checkpoint.every = 10
    c.checkpoint.max_to_keep = 3
    return c

