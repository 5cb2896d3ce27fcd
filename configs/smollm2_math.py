r"""SmolLM2-135M-Instruct on a math set (GSM8K by default), CPU-sized.

Needs two local things (no network at run time):
    python -m trustrl.tools.get_smollm2 assets/smollm2-135m     # the model (HF directory)
    GSM8K's train.jsonl / test.jsonl in a directory of your choice (manual_dir)

    python -m trustrl.main --config=configs/smollm2_math.py \
        --config.task.manual_dir=/path/to/gsm8k --workdir=workdirs/smollm2_gsm8k

The chat template asks for \boxed{} answers; rewards use math-verify. On 2 CPU cores one
iteration (8 prompts x 4 samples, 256 new tokens) takes minutes; this config is for checking
the pipeline on a real pretrained model, not for results.
"""
import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    task = arg or "gsm8k"
    c = default.get_config("default")
    c.model.hf_dir = "assets/smollm2-135m"  # python -m trustrl.tools.get_smollm2 DIR
    c.tokenizer.path = ""  # empty: the model directory's tokenizer
    c.task.name = task  # gsm8k | math | dapo_math | aime
    c.task.template = "chat"
    c.task.manual_dir = ""  # REQUIRED: directory with the downloaded files
    c.warmstart.steps = 0  # pretrained: no warm start
    c.rollout.prompts_per_iter = 8
    c.rollout.group_size = 4
    c.rollout.max_new_tokens = 256
    c.train.iterations = 20
    c.train.minibatches = 4
    c.optim.learning_rate = 1e-6  # the paper's full-parameter learning rate
    c.loss.delta_low = c.loss.delta_high = 0.2  # the paper's scaling-run TV threshold
    c.loss.is_cap = 5.0  # C = 5 in the scaling runs
    c.eval.every = 10
    c.eval.num_prompts = 32
    return c
