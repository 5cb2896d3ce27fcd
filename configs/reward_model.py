r"""Bradley-Terry reward-model training (``python -m trustrl.tools.train_reward_model``).

    python -m trustrl.tools.train_reward_model --config=configs/reward_model.py \
        --workdir=workdirs/rm_wordpref --out=workdirs/rm_wordpref/hf

Variants (``--config=configs/reward_model.py:VARIANT``):
    wordpref      the CPU demo's reward model (default): a fresh 2-layer decoder trained on
                  synthetic "wordpref" pairs whose labels come from a hidden scoring rule
                  (trustrl.data.preferences), then used by configs/rlhf.py:demo (docs/rlhf.md)
    tiny          a few steps for the tests
    ultrafeedback pairs from local UltraFeedback-binarized files on a Hugging Face base
                  (set base.hf_dir and pairs.manual_dir)
"""
import ml_collections

VALID_VARIANTS = ("wordpref", "tiny", "ultrafeedback")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "wordpref"
    if variant not in VALID_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {VALID_VARIANTS}")
    c = ml_collections.ConfigDict()
    c.seed = 0  # head init and pair order
    c.mesh = dict(data=-1, fsdp=1, tensor=1)

    c.base = ml_collections.ConfigDict()
    c.base.hf_dir = ""  # a Hugging Face causal LM to start from ("": fresh, from the fields)
    c.base.num_layers = 2
    c.base.hidden_size = 128
    c.base.intermediate_size = 384
    c.base.num_heads = 4
    c.base.num_kv_heads = 2
    c.base.head_dim = 32

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # HF tokenizer dir ("": base.hf_dir's, else a BPE trained on pairs)
    c.tokenizer.vocab_size = 320  # the trained BPE's size
    c.tokenizer.split_digits = True

    c.pairs = ml_collections.ConfigDict()
    c.pairs.name = "wordpref"  # wordpref (synthetic) | ultrafeedback | hh_rlhf
    c.pairs.manual_dir = ""  # the downloaded pair files (ultrafeedback / hh_rlhf)
    c.pairs.data_dir = ""  # where the tfds dataset is built ("": WORKDIR/data)
    c.pairs.num_train = 4096  # synthetic pairs
    c.pairs.num_test = 128  # held-out pairs (synthetic; or held out of files without a test split)
    c.pairs.seed = 0
    c.pairs.difficulty = 24  # wordpref: lexicon size
    c.pairs.rule_seed = 0  # wordpref: the hidden rule
    c.pairs.label_noise = 0.0  # wordpref: probability a pair's label is flipped

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.optim.schedule = "cosine"
    c.optim.final_lr_frac = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 400  # optimizer steps
    c.train.batch_size = 32  # pairs per step (2 x rows)
    c.train.max_length = 128  # tokens of a rendered exchange (longer: cut, counted)
    c.train.eval_every = 100  # steps between held-out accuracy evals (and at the end)
    c.train.dtype = "float32"  # compute dtype (the export is in float32)

    if variant == "tiny":
        c.mesh = dict(data=2, fsdp=1, tensor=4)
        c.base.num_layers = 1
        c.base.hidden_size = 32
        c.base.intermediate_size = 64
        c.base.num_heads = 4
        c.base.num_kv_heads = 4
        c.base.head_dim = 8
        c.tokenizer.vocab_size = 300
        c.pairs.num_train = 64
        c.pairs.num_test = 16
        c.train.steps = 4
        c.train.batch_size = 8
        c.train.eval_every = 2
    if variant == "ultrafeedback":
        c.pairs.name = "ultrafeedback"
        c.train.max_length = 2048
        c.train.dtype = "bfloat16"
        c.train.batch_size = 64
        c.train.steps = 2000
        c.optim.learning_rate = 2e-6
    return c
