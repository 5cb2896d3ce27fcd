r"""The embedded default: DPPO-Binary-TV on synthetic addition with a tiny model, on CPU.

Command (from the repository root, after `make install`):

    python -m trustrl.main --config=configs/default.py --workdir=workdirs/default

Hardware / time: 2 CPU cores, a few minutes on an idle machine: a byte-level BPE tokenizer is
trained on the task text (seconds), a ~0.8M-parameter decoder is warm-started with supervised
steps on worked examples until the answer loss is below 0.15 (cached under workdirs/cache), the
base is evaluated on 256 held-out prompts (step 0 of metrics.jsonl), then 150 RL iterations at a
cosine-decayed learning rate. The closing summary (trustrl.analysis.summary) prints the first / last
10-iteration training reward and the held-out change since step 0 with standard errors;
docs/demo_robustness.md has the measured spread over seeds and emulated CPU code paths.

Variants (``--config=configs/default.py:VARIANT``):
    default   the command above
    tiny      a shrunken config for tests (seconds; 2x4 mesh-friendly batch sizes)
    tiny_moe  tiny with a mixture of experts (Qwen3-MoE: 4 experts, top-2, 2 layers); trains on
              CPU (docs/moe.md)
    lora      the default run training LoRA adapters (r 16, alpha 32, every projection) on the
              frozen warm-started base, at a 10x learning rate (docs/lora.md)
    tiny_lora tiny with LoRA adapters (tests)

Any field can be overridden: ``--config.loss.method=dppo_binary_kl --config.loss.delta_low=0.05``.
"""
import ml_collections

VALID_VARIANTS = ("default", "tiny", "tiny_moe", "lora", "tiny_lora")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VALID_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {VALID_VARIANTS}")
    c = ml_collections.ConfigDict()
    c.seed = 0  # RL seed: prompt order, sampling (and init when there is no warm start)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # mesh axis sizes; one -1 is filled in
    # a split layout (trustrl.training.async_rollouts): devices > 0 (a count, or a fraction in
    # (0, 1)) gives the rollout sampler that many devices with this layout; `mesh` then lays
    # out the trainer over the rest. Needed by train.mode="async"; with "sync", the sequential
    # baseline of the same layout. replicas R > 1: the sampler devices form R independent
    # meshes of this layout, replica r sampling prompts r * P / R .. (r + 1) * P / R; with
    # several processes each replica lies on one process (needed by async with several)
    c.sampler_mesh = dict(devices=0.0, data=-1, fsdp=1, tensor=1, replicas=1)

    c.model = ml_collections.ConfigDict()
    c.model.hf_dir = ""  # local Hugging Face dir to load (empty: build from the fields below)
    c.model.num_layers = 4  # decoder layers
    c.model.hidden_size = 128  # model width
    c.model.intermediate_size = 384  # SwiGLU hidden width
    c.model.num_heads = 4  # attention heads
    c.model.num_kv_heads = 2  # key / value heads (GQA)
    c.model.head_dim = 32  # per-head width
    c.model.rope_theta = 10000.0  # RoPE base
    c.model.tie_word_embeddings = True  # share embedding and output head
    c.model.param_dtype = "float32"  # trainer parameter dtype
    c.model.dtype = "float32"  # trainer compute dtype
    c.model.remat = False  # rematerialise each layer in the backward pass
    # attention kernel (trustrl.model.attention.BACKENDS); "auto" picks for the mesh's devices:
    # splash on TPU, cuDNN on GPU (bf16), the einsum reference / blockwise on CPU
    c.model.attention = "auto"
    # Mixture of experts (Hugging Face Qwen3MoeConfig's fields; docs/moe.md). num_experts > 0
    # builds a qwen3_moe model (qwen3 attention with q/k norm) from these fields; a model.hf_dir
    # brings its own (only moe_impl / moe_capacity_factor, router_aux_loss_coef and
    # routing_replay apply to it). Layer i has experts when i is not in mlp_only_layers and
    # (i + 1) % decoder_sparse_step == 0; the other layers keep the dense intermediate_size MLP.
    c.model.num_experts = 0  # experts per sparse layer (0: a dense model)
    c.model.num_experts_per_tok = 0  # top-k experts per token (1 <= k <= num_experts)
    c.model.moe_intermediate_size = 0  # each expert's SwiGLU width (>= 1 with experts)
    c.model.norm_topk_prob = True  # renormalise the k gate weights to sum 1 (Qwen3-30B-A3B)
    c.model.decoder_sparse_step = 1  # every n-th layer has experts
    c.model.mlp_only_layers = ()  # layer indices that keep the dense MLP
    # experts kernel (trustrl.model.moe.IMPLS): ragged (grouped matmul, dropless) | dense (one-hot
    # reference, every expert on every token) | capacity (fixed rows per expert, drops overflow)
    c.model.moe_impl = "ragged"
    c.model.moe_capacity_factor = 0.0  # moe_impl="capacity" only: rows = factor * N * k / X
    c.model.router_aux_loss_coef = 0.0  # load-balancing loss weight (0: off; logged either way)
    # R3 (rollout routing replay): the trainer routes each token to the experts the rollout
    # recorded, with gate weights from its own router (MoE models only)
    c.model.routing_replay = False
    # LoRA adapters (trustrl.model.lora; docs/lora.md): rank > 0 trains only adapters on the
    # projections in targets, on a frozen base (the warm-started / loaded model)
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0  # adapter rank r (0: LoRA off, every parameter trains)
    c.model.lora.alpha = 0.0  # the adapter's output is scaled by alpha / rank (PEFT's lora_alpha)
    c.model.lora.targets = ()  # some of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    c.model.lora.init = "kaiming"  # A's init: kaiming (PEFT's default) | gaussian; B is zero
    c.model.lora.base_quant = ""  # the frozen base's kernels: "" (param_dtype) | int8 | fp8
    c.model.lora.init_from = ""  # a PEFT adapter directory to start from ("": fresh adapters)

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # HF tokenizer dir; empty: train a byte-level BPE on task text
    c.tokenizer.vocab_size = 278  # size of the trained BPE (ignored with a path)
    c.tokenizer.split_digits = True  # one token per digit in the trained BPE

    c.task = ml_collections.ConfigDict()
    c.task.name = "arithmetic"  # arithmetic | countdown | gsm8k | math | dapo_math | aime
    c.task.difficulty = 2  # digits per operand for arithmetic / numbers for countdown
    c.task.operations = "+"  # arithmetic operators to sample from
    c.task.num_train = 20000  # synthetic training problems
    c.task.num_test = 256  # held-out problems for eval
    c.task.seed = 0  # problem generation and train / test split (shared by all RL seeds)
    c.task.data_dir = ""  # where the tfds array_record dataset is built (empty: workdir/data)
    c.task.manual_dir = ""  # downloaded files for math sets
    c.task.template = "plain"  # plain | chat
    c.task.reward_correct = 1.0  # reward of a correct answer
    c.task.reward_wrong = 0.0  # reward of a wrong / malformed answer
    # Long-tailed filler (trustrl.data.tasks): worked answers say filler_min..filler_max
    # pseudo-words
    # from a Zipf(filler_zipf) law over a filler_words lexicon before "Answer: x" (0 = none).
    c.task.filler_words = 0
    c.task.filler_zipf = 1.1
    c.task.filler_min = 4
    c.task.filler_max = 12
    # Keep only training problems the base solves at a rate in [solve_band_low, solve_band_high]
    # over filter_samples rollout samples each, from the first filter_pool problems (0 = off).
    c.task.filter_samples = 0
    c.task.filter_pool = 2048
    c.task.solve_band_low = 0.2
    c.task.solve_band_high = 0.8

    c.warmstart = ml_collections.ConfigDict()
    # Stop on a target answer loss, not a fixed step count: the loss falls through a sharp phase
    # transition whose step moves with the init and the CPU (443-900 steps seen), so a fixed
    # count gives bases from 0.06 to 0.75 greedy pass@1 (issue 10); the target gives one quality.
    c.warmstart.steps = 1500  # max supervised steps on worked examples before RL (0: none)
    c.warmstart.target_loss = 0.15  # stop once the answer-token loss is below this (0: never)
    c.warmstart.batch_size = 64  # sequences per supervised step
    c.warmstart.learning_rate = 3e-3  # peak AdamW learning rate
    c.warmstart.cache_dir = "workdirs/cache"  # warm starts are keyed by config and reused
    c.warmstart.seed = 0  # init + batch order of the warm start (shared by all RL seeds)
    c.warmstart.dtype = ""  # compute dtype of the warm start and the filter ("" = model.dtype)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_iter = 32  # prompts sampled per iteration
    c.rollout.group_size = 8  # responses per prompt
    c.rollout.max_new_tokens = 8  # response length cap
    c.rollout.temperature = 1.0  # sampling temperature (rollout_logp uses the same)
    c.rollout.top_p = 1.0  # nucleus truncation (1.0 = off; warns: mu != sampling dist)
    c.rollout.top_k = 0  # top-k truncation (0 = off)
    c.rollout.record_topk = 20  # K of the recorded rollout top-K (top-K methods need it)
    c.rollout.max_rows = 0  # rows decoded at once (0 = all); bounds the sampler's memory
    c.rollout.continuous = True  # max_rows slots refilled as rows end (else split calls)
    c.rollout.refill_rows = 0  # rows prefilled per refill (0 = max_rows / 8, at most 8)
    # keep the sampler's KV cache on the devices from one rollout to the next (saves one
    # allocation per iteration; False frees it before the score pass and the train step)
    c.rollout.keep_kv_cache = False
    c.rollout.dtype = "bfloat16"  # rollout precision: float32 / bfloat16 / int8 / fp8 weights
    c.rollout.head_dtype = ""  # "" = rollout.dtype; "float32": fp32 LM head on the rollout trunk
    c.rollout.dynamic_sampling = False  # drop all-equal-reward groups and refill
    c.rollout.max_refill_rounds = 4  # extra sampling rounds for dynamic sampling
    c.rollout.overlong = "none"  # none | filter (no loss on truncated) | penalty
    c.rollout.overlong_penalty = -1.0  # reward of a truncated response with "penalty"
    # where mu comes from: "sampler" (the recorded log-probs) | "rescored" (the trainer's forward
    # of the rollout's parameters replaces them: pi_old == mu exactly; trustrl.rollout.mismatch)
    c.rollout.mu = "sampler"
    # the mismatch dial (trustrl.rollout.mismatch): deliberate, labelled mismatch sources, each
    # independent (precision is rollout.dtype); `python -m trustrl.tools.calibrate_mismatch`
    c.rollout.mismatch = ml_collections.ConfigDict()
    c.rollout.mismatch.noise = 0.0  # std of N(0, s^2) on the rollout's logits (mu: noised)
    c.rollout.mismatch.staleness = 0  # roll out with the parameters of k optimizer steps earlier
    c.rollout.mismatch.pre_temperature = False  # trap: record log-probs before the temperature
    c.rollout.mismatch.top_p_renorm = False  # trap: record the top-p / top-k renormalised ones

    # Environment episodes (trustrl.training.episodes; docs/environments.md): an id runs
    # multi-turn episodes (task.num_train seeds) instead of prompt -> response; "" = the task
    c.env = ml_collections.ConfigDict()
    c.env.id = ""  # trustrl:guess_sum | trustrl:guess_number | GEM ids (game:*, rg:*, ...)
    c.env.template = "plain"  # turn rendering: plain | chatml (trustrl.data.environments)
    c.env.max_turns = 4  # policy turns per episode
    c.env.max_turn_tokens = 8  # policy tokens per turn
    c.env.max_total_tokens = 64  # trajectory tokens after the first prompt (policy + obs)
    c.env.advantage = "episode"  # episode (return, group baseline) | turn (return-to-go)
    c.env.kwargs = ml_collections.ConfigDict()  # the environment's constructor arguments

    # A learned reward model (RLHF; trustrl.training.rlhf, docs/rlhf.md): hf_dir set scores the
    # responses with a Hugging Face *ForSequenceClassification directory instead of the task's
    # verifier; the conversation is re-rendered with the reward model's own tokenizer
    c.reward_model = ml_collections.ConfigDict()
    c.reward_model.hf_dir = ""  # the reward model ("": rewards from the task's verifier)
    c.reward_model.tokenizer = ""  # its tokenizer dir ("": hf_dir's)
    c.reward_model.dtype = "bfloat16"  # parameters and compute of the scoring pass
    c.reward_model.template = "chat"  # chat (its tokenizer's chat template) | plain
    c.reward_model.max_length = 2048  # tokens of a rendered exchange; longer ones are cut
    c.reward_model.truncation = "right"  # right (keep the start) | left (keep the end)
    c.reward_model.batch_size = 0  # rows per scoring call, sorted by length (0: all at once)
    c.reward_model.bucket = 64  # scored widths are multiples of this (one compile per width)
    c.reward_model.normalize = "none"  # none | batch | running (mean / std of all seen)
    c.reward_model.clip = 0.0  # clip |reward| after normalising (0: off)
    c.reward_model.length_penalty = 0.0  # minus coef * response tokens / max_new_tokens
    c.reward_model.kl_coef = 0.0  # minus coef * sum_t (log mu - log pi_ref), pi_ref: the base

    c.loss = ml_collections.ConfigDict()
    c.loss.method = "dppo_binary_tv"  # see trustrl.core.losses.METHODS
    c.loss.delta_low = 0.15  # threshold on the A < 0 side (eps_low for ratio clips)
    c.loss.delta_high = 0.15  # threshold on the A > 0 side (eps_high for ratio clips)
    c.loss.is_cap = float("inf")  # IS weight cap C (inf = none)
    c.loss.agg = "token-mean"  # see trustrl.core.losses.AGGREGATIONS
    c.loss.alpha = 0.1  # mu cutoff of relax_* methods (ignored otherwise)
    c.loss.advantage = "group_mean"  # group_mean | grpo | rloo
    c.loss.trm_divergence = "binary_tv"  # token divergence trm_seq masks on
    # The trust-region family after DPPO (trustrl.core.losses.PARAMS; docs/trust_region_family.md);
    # each is read only by its method
    c.loss.icepop_low = 0.5  # icepop: keep tokens with icepop_low <= pi/mu <= icepop_high (AReaL)
    c.loss.icepop_high = 5.0
    c.loss.kpop_phi = 2.0  # kpop: mask max(KL_b(pi||mu), KL_b(mu||pi)) > phi (AReaL example)
    c.loss.opsm_delta = 1e-4  # opsm: mask A<0 rows with mean log(mu/pi) > delta (slime default)
    c.loss.geo_low = 0.99  # geo_seq_mask: keep rows with geo_low <= geo-mean pi/mu <= geo_high
    c.loss.geo_high = 1.01  # (SkyRL defaults)
    c.loss.drpo_eps = 12.5  # drpo: penalty |A| mu (r-1)^2 / (2 eps) (UniRL / paper sec. 4 default)
    c.loss.m2po_threshold = 0.04  # m2po: block the largest (log mu - log pi_old)^2 of the minibatch
    #                               until the rest's mean is below this (AReaL gsm8k_m2po.yaml)
    c.loss.cppo_delta = 0.15  # cppo: Binary-TV threshold (paper Table 3, dense models)
    c.loss.cppo_w_min = 0.8  # cppo: position weight 1 -> w_min over the response
    c.loss.cppo_delta_b = 0.02  # cppo: prefix budget per unit weight (floor; 2x ceiling)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4  # AdamW learning rate for RL (2e-4: held-out fell late, issue 10)
    c.optim.warmup_steps = 10  # linear warmup (optimizer steps)
    c.optim.schedule = "cosine"  # after warmup: constant | cosine (decay to final_lr_frac * lr)
    c.optim.final_lr_frac = 0.1  # the cosine schedule's last rate, as a fraction of lr
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.99  # Adam beta2
    c.optim.weight_decay = 0.0  # decoupled weight decay
    c.optim.grad_clip = 1.0  # global-norm clipping (0 = off)

    c.train = ml_collections.ConfigDict()
    c.train.iterations = 150  # RL iterations (rollout + updates)
    c.train.epochs = 1  # passes over each iteration's rollouts
    c.train.minibatches = 4  # optimizer steps per epoch
    c.train.microbatches = 1  # gradient accumulation: micro-batches per optimizer step (exact)
    c.train.score_pass = True  # recompute pi_old at rollout params (mismatch log, *_recompute)
    # the score pass runs the iteration's rows in this many parts (0: minibatches x microbatches,
    # i.e. as many rows at once as a train micro-batch); exact, only memory changes
    c.train.score_microbatches = 0
    # "sync": sample, then train. "async" (needs sampler_mesh.devices): the sampler samples
    # iteration j + 1.. while the trainer updates on j, from parameters at most max_staleness
    # iterations old (it waits rather than sample staler), synced every sync_every iterations
    c.train.mode = "sync"
    c.train.max_staleness = 1
    c.train.sync_every = 1
    # which allowed version a rollout samples with: "newest" (the newest published when it
    # starts: the freshest, timing decides) or "scheduled" (rollout j uses the oldest version
    # >= j - max_staleness: reproducible; needed by async with several processes)
    c.train.rollout_version = "newest"
    # async only: C > 0 decodes rollouts in segments of C tokens; a row still generating when
    # new weights arrive continues with them (each token keeps the mu, and the version, of the
    # weights that sampled it; trustrl.rollout.partial). 0: a rollout uses one version
    c.train.partial_rollouts = 0
    # benchmark-only: seconds slept inside the sample / train phase (emulated device time that
    # takes no CPU; benchmarks/async_rl.py); 0 in every real run
    c.train.emulate_sample_s = 0.0
    c.train.emulate_train_s = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 25  # iterations between evals (0 = off); also before RL (step 0) and at the end
    c.eval.num_prompts = 256  # held-out prompts per eval (all of task.num_test: less noise)
    c.eval.k = 4  # samples per prompt for pass@k / maj@k

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 25  # iterations between checkpoints; also at the end
    c.checkpoint.max_to_keep = 2  # checkpoints kept

    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = True  # also write TensorBoard event files
    c.log.progress = True  # tqdm progress bar

    if variant in ("tiny", "tiny_moe", "tiny_lora"):
        c.mesh = dict(data=2, fsdp=1, tensor=4)
        c.model.num_layers = 1
        c.model.hidden_size = 32
        c.model.intermediate_size = 64
        c.model.num_heads = 4
        c.model.num_kv_heads = 4
        c.model.head_dim = 8
        c.tokenizer.vocab_size = 264
        c.task.num_train = 256
        c.task.num_test = 16
        c.warmstart.steps = 2
        c.warmstart.batch_size = 8
        c.warmstart.cache_dir = ""
        c.rollout.prompts_per_iter = 4
        c.rollout.group_size = 2
        c.rollout.max_new_tokens = 4
        c.rollout.record_topk = 4
        c.train.iterations = 2
        c.train.minibatches = 2
        c.eval.every = 1
        c.eval.num_prompts = 8
        c.eval.k = 2
        c.checkpoint.every = 1
        c.log.tensorboard = False
        c.log.progress = False
    if variant == "tiny_moe":  # tiny, with experts: the CPU smoke / learning preset of MoE
        c.model.num_layers = 2
        c.model.num_experts = 4
        c.model.num_experts_per_tok = 2
        c.model.moe_intermediate_size = 32
    if variant in ("lora", "tiny_lora"):
        c.model.lora.rank = 16 if variant == "lora" else 4
        c.model.lora.alpha = 2.0 * c.model.lora.rank
        c.model.lora.targets = ALL_PROJECTIONS
        c.optim.learning_rate = 1e-3  # LoRA's usual 10x (the paper: 1e-5 vs 1e-6)
    return c
