r"""Environment-driven (multi-turn) RL: episodes instead of prompt -> response
(docs/environments.md).

CPU demo (a few minutes on 2 cores): the tiny warm-started model of configs/default.py plays
trustrl:guess_sum, an addition question answered over up to 3 turns with "higher" / "lower"
feedback after a wrong answer (reward 1 when right):

    python -m trustrl.main --config=configs/environments.py --workdir=workdirs/guess_sum

Variants (``--config=configs/environments.py:VARIANT``):
    default   the CPU demo above
    tiny      a shrunken demo for tests (seconds)
    arc1d     App. F.5: Qwen3-1.7B-Base on reasoning-gym Arc1D through GEM (rg:arc_1d, one turn)
    acre      App. F.5: Qwen3-1.7B-Base on reasoning-gym Acre through GEM (rg:acre, one turn)
    sudoku    App. F.5: Qwen3-1.7B-Base on GEM's game:Sudoku-v0-easy (multi-turn)

The App. F.5 presets (GEM ids need the optional `envs` extra: pip install -e ".[envs]",
Python <= 3.12.0) need a local Qwen3-1.7B-Base directory: --config.model.hf_dir=/path. They run
DPPO-Binary-TV at TV delta 0.2; the paper's other arm is PPO ratio clipping with only the mask
different: --config.loss.method=ppo_clip (eps 0.2). PAPER.md says the runs used the Oat
framework's "stock hyperparameters" and gives no values; the learning rate, batch sizes, turn
and token limits below are trustrl's choices, not the paper's.
"""
import ml_collections

from configs import default

VALID_VARIANTS = ("default", "tiny", "arc1d", "acre", "sudoku")
F5_ENVS = {"arc1d": "rg:arc_1d", "acre": "rg:acre", "sudoku": "game:Sudoku-v0-easy"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VALID_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {VALID_VARIANTS}")
    if variant in F5_ENVS:
        return _f5(variant)
    c = default.get_config("tiny" if variant == "tiny" else "default")
    c.env.id = "trustrl:guess_sum"
    c.env.template = "plain"
    c.env.max_turns = 3
    c.env.max_turn_tokens = 6  # " 153" + EOS is 5 tokens (one per digit)
    c.env.max_total_tokens = 40
    c.env.advantage = "episode"
    c.env.kwargs.difficulty = c.task.difficulty
    c.env.kwargs.operations = c.task.operations
    c.train.iterations = 100
    c.eval.every = 25
    if variant == "tiny":
        c.env.max_turns = 2
        c.env.max_turn_tokens = 4
        c.env.max_total_tokens = 32  # room for an observation ("\ninvalid\nAnswer:" ~16)
        c.train.iterations = 2
        c.eval.every = 1
    return c


def _f5(variant: str) -> ml_collections.ConfigDict:
    c = default.get_config("default")
    c.model.hf_dir = ""  # REQUIRED: a local Qwen3-1.7B-Base directory
    c.tokenizer.path = ""  # the model directory's tokenizer
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.warmstart.steps = 0  # pretrained
    c.env.id = F5_ENVS[variant]
    c.env.template = "chatml"
    multi = variant == "sudoku"
    c.env.max_turns = 16 if multi else 1
    c.env.max_turn_tokens = 1024 if multi else 4096
    c.env.max_total_tokens = 8192 if multi else 4096
    c.env.advantage = "episode"
    c.loss.method = "dppo_binary_tv"
    c.loss.delta_low = c.loss.delta_high = 0.2  # App. F.5: TV delta 0.2
    c.loss.advantage = "grpo"
    c.rollout.prompts_per_iter = 16
    c.rollout.group_size = 8
    c.rollout.temperature = 1.0
    c.train.iterations = 200
    c.train.minibatches = 4
    c.train.microbatches = 4
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.eval.every = 20
    c.eval.num_prompts = 64
    c.eval.k = 1
    c.task.num_train = 100_000  # environment seeds 0 .. num_train - 1
    return c
