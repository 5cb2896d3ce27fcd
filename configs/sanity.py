r"""The paper's sanity test (sec. 5) at laptop scale: which methods stay stable under a real
bf16 rollout / fp32 trainer mismatch. ``--config=configs/sanity.py:NAME[,small]``.

Setup (shared by every run; only the loss differs):
  * task: synthetic 2-digit addition (configs/default.py), base policy = the cached 400-step
    supervised warm start (greedy pass@1 ~0.84, T=1 training reward ~0.75);
  * rollout bf16 (weights, activations, KV cache) vs trainer fp32 at equal parameters: the
    natural mismatch of two code paths, no artificial noise;
  * 32 prompts x 8 responses per iteration (the paper: 64 x 8; halved for CPU time), 4 gradient
    steps per iteration as in the paper, one learning rate for every method (2e-4: on the
    default pilot 5e-4 degraded DPPO itself, 1e-4 barely moved in 60 iterations);
  * NAME from SANITY_METHODS; the *_fp32 controls roll out in fp32 (no mismatch).
Collapse (defined before running): after its best 10-iteration mean training reward, a run's
10-iteration mean falls below half of that best and stays there to the end, with max (pi - mu)
growing. "small" is the CI-sized variant (tiny model, 3 iterations).

    python launch/sanity.py --workdir=workdirs/sanity            # the study + docs/results.md
"""
import ml_collections

from configs import default, methods

INF = float("inf")
# name -> (paper-method config name in configs/methods.py, rollout dtype)
SANITY_METHODS = {
    **{name: (name, "bfloat16") for name in methods.PAPER_METHODS},
    "pg_is_fp32": ("pg_is", "float32"),
    "dppo_binary_tv_fp32": ("dppo_binary_tv", "float32"),
}
CORE = ("dppo_binary_tv", "dppo_binary_kl", "grpo_clip_higher", "pg_is", "pg_tis", "minirl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, _, variant = (arg or "dppo_binary_tv").partition(",")
    if name not in SANITY_METHODS:
        raise ValueError(f"unknown sanity run {name!r}; valid: {sorted(SANITY_METHODS)}")
    if variant not in ("", "small"):
        raise ValueError(f"unknown variant {variant!r}; valid: '' or 'small'")
    paper_name, rollout_dtype = SANITY_METHODS[name]
    c = methods.get_config(paper_name + (",tiny" if variant == "small" else ""))
    c.rollout.dtype = rollout_dtype
    c.optim.learning_rate = 2e-4
    c.train.minibatches = 4
    c.log.progress = False
    if variant == "small":
        c.train.iterations = 3
        c.rollout.prompts_per_iter = 4
        c.rollout.group_size = 4
    else:
        c.train.iterations = 150
        c.eval.every = 50
        c.checkpoint.every = 50
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """3 seeds for the core six, 1 for the rest and the fp32 controls."""
    del arg
    runs = []
    for name in SANITY_METHODS:
        for seed in range(3 if name in CORE else 1):
            runs.append({"config_arg": name, "seed": seed})
    return runs
