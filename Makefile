# One-command entry points. `make test` works from a fresh clone: it creates .venv if needed.
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
STAMP = $(VENV)/.trustrl-installed
BASE_STAMP = $(VENV)/.trustrl-base-installed
LATEST_VENV ?= .venv-latest
PY312 ?=

.PHONY: test install demo rlhf-demo sanity sanity-quant clean test-latest install-latest test-extended

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(VENV)/bin/python setup.py
	$(PIP) install -q -e ".[test,hf,envs]"
	touch $(STAMP)

$(BASE_STAMP): $(VENV)/bin/python setup.py
	$(PIP) install -q -e .
	touch $(BASE_STAMP)

install: $(STAMP)

# The embedded default: DPPO-Binary-TV on synthetic addition, tiny model, CPU, a few minutes.
demo: $(BASE_STAMP)
	$(VENV)/bin/python -m trustrl.main --config=configs/default.py --workdir=workdirs/default

# The offline RLHF demo (docs/rlhf.md): a reward model trained on synthetic preference pairs
# with a hidden ground truth, then DPPO against it; prints the reward model's score and the
# ground truth before / after (~10 min on 2 CPU cores).
rlhf-demo: $(BASE_STAMP)
	$(VENV)/bin/python launch/rlhf_demo.py --workdir=workdirs/rlhf_demo

# The laptop-scale sanity study of docs/results.md (~2 h on 2 CPU cores; finished runs are reused).
sanity: $(BASE_STAMP)
	$(VENV)/bin/python launch/sanity.py --workdir=workdirs/sanity --parallel=2 --out=docs
	$(VENV)/bin/python launch/sanity.py --workdir=workdirs/sanity --parallel=2 --out=docs --stress
	$(VENV)/bin/python launch/sanity.py --workdir=workdirs/sanity --out=docs --mismatch_profile

# Issue 15's study under int8 / fp8 rollouts (docs/quant_study.md): 52 runs of 200 iterations,
# ~7 h on 2 CPU cores, in priority order (configs/sanity.py get_quant_sweep); stop it any time,
# rerunning continues and the tables cover the runs that exist.
sanity-quant: $(BASE_STAMP)
	$(VENV)/bin/python launch/sanity.py --quant --workdir=workdirs/sanity --out=docs --mismatch_profile
	$(VENV)/bin/python launch/sanity.py --quant --workdir=workdirs/sanity --parallel=2 --out=docs

# 8 simulated CPU devices are set in tests/conftest.py before jax is imported. XDIST workers
# (default 3, one more than the 2 cores CI has: XLA compiles are single-threaded, so a third
# worker fills the idle core-time; measured 3.11 leg 22:43 -> 16:36 with the cheaper compile).
# --dist load --maxschedchunk 1: one test at a time to whichever worker is free, in the order
# tests/conftest.py sorts them (longest first), so no long test is left running alone at the end.
# The TPU compile checks (tests/tools/test_aot_check.py, tests/rollout/test_continuous.py) compile for a TPU
# topology from this CPU host with libtpu's compile-only devices: the libtpu that the installed
# jax pins (its `tpu` extra) goes into $(LIBTPU), outside the venv's site-packages, so only the
# subprocesses that ask for it load it (TRUSTRL_LIBTPU_PATH).
XDIST ?= 3
LIBTPU = $(VENV)/libtpu
LIBTPU_STAMP = $(LIBTPU)/.installed
$(LIBTPU_STAMP): $(STAMP)
	rm -rf $(LIBTPU)
	$(PIP) install -q --no-deps --target $(LIBTPU) "$$($(VENV)/bin/python .ci/libtpu_requirement.py)"
	touch $(LIBTPU_STAMP)

test: $(STAMP) $(LIBTPU_STAMP)
	$(VENV)/bin/python .ci/versions.py
	TRUSTRL_LIBTPU_PATH=$(abspath $(LIBTPU)) $(VENV)/bin/python -m pytest -q -n $(XDIST) \
	  --dist load --maxschedchunk 1 --durations=15 -m "not extended" tests

# The extended tier (tests/conftest.py's _EXTENDED: the heaviest MoE / LoRA tests, benchmark
# smoke runs and the equality variants whose path another CI test covers; ~25 CPU-minutes),
# left out of `make test` to keep CI within 20 minutes.
test-extended: $(STAMP) $(LIBTPU_STAMP)
	TRUSTRL_LIBTPU_PATH=$(abspath $(LIBTPU)) $(VENV)/bin/python -m pytest -q -n $(XDIST) \
	  --dist load --maxschedchunk 1 --durations=15 -m extended tests

# The newest stack: Python 3.12 (jax >= 0.11 needs it; PY312=... overrides the search in
# .ci/find-python), the newest releases setup.py allows, no torch / transformers (their parity
# tests skip). Re-resolved on every run: --upgrade-strategy eager moves every dependency up.
# To keep CI within its time budget this leg runs LATEST_TESTS (below) without the `slow` tests
# (>= ~10 s: notebooks, whole training runs, SmolLM2 builds, benchmarks, the heaviest
# equivalence tests), which the 3.11 leg runs; one tiny run with a resume
# (tests/analysis/test_summary.py) still goes end to end here.
$(LATEST_VENV)/bin/python:
	py="$(PY312)"; [ -n "$$py" ] || py="$$(.ci/find-python 3.12)" && "$$py" -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip

install-latest: $(LATEST_VENV)/bin/python
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[test-core,hf]"

# The leg runs the layers where a newer jax / flax / optax / orbax / tfds shows first (the
# math, the model, the samplers, checkpoints, sharding, data, micro-batching, one tiny run with
# a resume); CI's time budget has no room for the whole suite twice (the multi-turn sampler and
# the engine client, which reuse the sampler's decode step, run on 3.11 only since CI passed
# 1,200 s). LATEST_TESTS=tests runs all.
LATEST_TESTS ?= tests/core tests/data tests/model/test_model.py tests/model/test_attention.py \
  tests/model/test_quant.py tests/model/test_hf.py tests/rollout/test_sampler.py \
  tests/rollout/test_continuous.py tests/infra/test_checkpoint.py tests/infra/test_sharding.py \
  tests/training/test_microbatch.py tests/training/test_sharded_state.py \
  tests/analysis/test_summary.py tests/test_layering.py
test-latest: install-latest
	$(LATEST_VENV)/bin/python .ci/versions.py
	$(LATEST_VENV)/bin/python -m pytest -q -n $(XDIST) --dist load --maxschedchunk 1 -rs -m "not slow and not extended" --durations=15 $(LATEST_TESTS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) *.egg-info
