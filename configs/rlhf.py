r"""RLHF against a learned reward model (the paper's sec. 7.2; docs/rlhf.md).

Variants (``--config=configs/rlhf.py:VARIANT``):
    demo        the offline CPU demo: a tiny policy on the synthetic "wordpref" prompts, rewarded
                by the reward model that ``configs/reward_model.py:wordpref`` trains from pairs
                labelled by a hidden rule (trustrl.data.preferences); the run logs the reward
                model's score AND the hidden ground truth (``reward/ground_truth_mean``,
                ``eval/ground_truth_mean``), so reward hacking (the first rising, the second not)
                is visible. ``make rlhf-demo`` runs both steps (launch/rlhf_demo.py).
    tiny        the demo shrunk for the tests (reward_model.hf_dir must be set)
    paper_dppo  sec. 7.2's DPPO-Binary-TV arm: Qwen3-4B-Instruct-2507 policy, UltraFeedback
                prompts, Skywork-Reward-Llama-3.1-8B (LlamaForSequenceClassification) rewards
    paper_grpo  the GRPO arm of the same comparison (PPO's ratio clip, eps 0.2); the group
                baseline (loss.advantage) is the same in both arms, so only the trust region
                differs
    paper_dppo_hh / paper_grpo_hh   the same with HH-RLHF prompts

The paper states the models, the prompt sets, the reward model and the evaluation (AlpacaEval 2.0
LC win rate: DPPO 80.90 vs GRPO 77.05 at step 150, from 59.39) but not the batch size, learning
rate, response length, threshold or reward shaping of its RLHF runs (../shared/PAPER.md is
silent on them). The paper_* presets therefore take Table 1's values where one applies (lr 1e-6,
TV delta 0.2, IS cap 5, bf16 training and rollout) and otherwise ours, marked "(ours)" below.
They are laid out for a v5p-32 slice (16 chips: fsdp 4 x tensor 4); the reward model scoring's
compiled memory for that slice is in docs/rlhf.md (trustrl.tools.aot_check --phases=reward).
Put the checkpoints and the prompt files on every worker's disk and set the paths.
"""
import ml_collections

from configs import default

VALID_VARIANTS = ("demo", "tiny", "paper_dppo", "paper_grpo", "paper_dppo_hh", "paper_grpo_hh")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "demo"
    if variant not in VALID_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {VALID_VARIANTS}")
    if variant.startswith("paper"):
        return _paper(variant)
    c = default.get_config("tiny" if variant == "tiny" else "default")
    c.task.name = "wordpref"  # prompts "Write about a and b."; no verifier, a hidden rule
    c.task.difficulty = 24  # the lexicon's size (the hidden rule weighs each word)
    c.task.rule_seed = 0  # the hidden rule (= configs/reward_model.py's pairs.rule_seed)
    c.task.num_train = 4096
    c.task.num_test = 128
    c.tokenizer.vocab_size = 320
    c.tokenizer.split_digits = False
    # the base writes random word lists (the warm start's "answers"); its loss cannot reach a
    # small target (the words are random), so it runs a fixed number of steps
    c.warmstart.steps = 300
    c.warmstart.target_loss = 0.0
    c.rollout.max_new_tokens = 24
    c.reward_model.hf_dir = "workdirs/rm_wordpref/hf"
    c.reward_model.dtype = "float32"
    c.reward_model.max_length = 128
    c.reward_model.bucket = 16
    c.train.iterations = 80
    c.eval.every = 20
    c.eval.num_prompts = 128
    c.checkpoint.every = 20
    if variant == "tiny":
        c.reward_model.hf_dir = ""  # the test's reward model
        c.task.num_train = 64
        c.task.num_test = 8
        c.tokenizer.vocab_size = 300
        c.warmstart.steps = 2
        c.rollout.max_new_tokens = 8
        c.reward_model.max_length = 64
        c.train.iterations = 2
        c.eval.every = 1
        c.eval.num_prompts = 4
        c.checkpoint.every = 1
    return c


def _paper(variant: str) -> ml_collections.ConfigDict:
    c = default.get_config("default")
    c.mesh = dict(data=1, fsdp=4, tensor=4)
    c.model.hf_dir = "/mnt/models/Qwen3-4B-Instruct-2507"
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.task.name = "hh_rlhf" if variant.endswith("_hh") else "ultrafeedback"
    c.task.manual_dir = "/mnt/data/" + ("hh-rlhf" if variant.endswith("_hh") else
                                       "ultrafeedback_binarized")
    c.task.template = "chat"
    c.task.num_test = 256  # held out of train when the files have no test split
    c.warmstart.steps = 0
    c.reward_model.hf_dir = "/mnt/models/Skywork-Reward-Llama-3.1-8B"
    c.reward_model.dtype = "bfloat16"
    c.reward_model.max_length = 4096  # (ours) prompt + response in the reward model's tokens
    c.reward_model.batch_size = 128  # (ours) rows per scoring call
    c.reward_model.bucket = 256
    c.rollout.prompts_per_iter = 128  # (ours)
    c.rollout.group_size = 8  # (ours)
    c.rollout.max_new_tokens = 2048  # (ours)
    c.rollout.dtype = "bfloat16"
    c.rollout.max_rows = 256
    c.loss.is_cap = 5.0
    if "grpo" in variant:  # GRPO's trust region: PPO's ratio clip
        c.loss.method = "ppo_clip"
        c.loss.delta_low = c.loss.delta_high = 0.2
    else:
        c.loss.method = "dppo_binary_tv"
        c.loss.delta_low = c.loss.delta_high = 0.2
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.1
    c.train.iterations = 300  # the paper reports step 150 and later, reward-hacking, ones
    c.train.minibatches = 4
    c.train.microbatches = 16
    c.eval.every = 25
    c.eval.num_prompts = 256
    c.eval.k = 1
    c.checkpoint.every = 25
    c.checkpoint.max_to_keep = 3
    return c
