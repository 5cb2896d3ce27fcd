"""Smoke tests of the benchmarks: their --quick modes on tiny sizes (no timing asserts)."""
import importlib.util
import math
import pathlib

import pytest

from trustrl.core import losses

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "loss_overhead.py"


def _load():
    spec = importlib.util.spec_from_file_location("trustrl_bench_loss_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_loss_overhead_quick_tiny(capsys):
    bench = _load()
    out = bench.main(["--quick", "--batch", "2", "--seq", "8", "--topk", "4", "--full-batch", "1",
                      "--full-seq", "2", "--vocab", "64", "--repeats", "2", "--warmup", "1",
                      "--full-repeats", "1"])
    printed = capsys.readouterr().out
    assert "ratio vs ppo_clip" in printed and "per-device MiB" in printed

    rows = {name: rest for name, *rest in out["loss_rows"]}
    assert set(losses.METHODS) <= set(rows), set(losses.METHODS) - set(rows)
    assert {"dppo_topk_tv + topk_tv(K=4)", "dppo_topk_kl + topk_kl(K=4)"} <= set(rows)
    assert len(rows) == len(losses.METHODS) + 2
    for name in rows:
        assert name in printed
    assert rows["ppo_clip"][1] == 1.0 and rows["ppo_clip"][3] == 1.0
    assert all(math.isfinite(v) and v > 0 for r in rows.values() for v in r)

    full = {(kind, layout): (ms, args, temps, peak) for kind, layout, ms, args, temps, peak
            in out["full_rows"]}
    assert len(full) == 4 and {k for k, _ in full} == {"full_tv", "full_kl"}
    for kind in ("full_tv", "full_kl"):
        unsharded = full[kind, "unsharded (1 device)"]
        sharded = full[kind, "vocab sharded (tensor=8)"]
        # 2 logits arrays [1, 2, 64] fp32 on one device; 1/8 of the vocabulary per device sharded.
        assert unsharded[1] * 2**20 == 2 * 1 * 2 * 64 * 4
        assert sharded[1] * 8 == unsharded[1]
        assert sharded[3] <= unsharded[3]


ROLLOUT_BENCH = BENCH.parent / "rollout_throughput.py"


@pytest.mark.slow
def test_rollout_throughput_quick_tiny(capsys):
    """benchmarks/rollout_throughput.py --quick: tiny config, 8 new tokens, one batch of 2."""
    pytest.importorskip("torch")  # its baseline is transformers' generate
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("trustrl_bench_rollout", ROLLOUT_BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--batches", "2"])
    printed = capsys.readouterr().out
    assert "compile time excluded" in printed and "EOS off" in printed
    assert [row[1] for row in rows] == [2] and "tiny" in rows[0][0]
    for _, _, hf_tps, fp32_tps, fp32_ratio, bf16_tps, bf16_ratio in rows:
        assert all(math.isfinite(v) and v > 0 for v in (hf_tps, fp32_tps, bf16_tps))
        assert fp32_ratio == pytest.approx(fp32_tps / hf_tps)
        assert bf16_ratio == pytest.approx(bf16_tps / hf_tps)


def _load_bench(name):
    spec = importlib.util.spec_from_file_location(f"trustrl_bench_{name}",
                                                  BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_memory_small(capsys):
    """benchmarks/train_memory.py on a tiny model: today's path vs blockwise + scan + remat."""
    bench = _load_bench("train_memory")
    variants = (bench.VARIANTS[0], ("blockwise, scan, remat full",
                                    dict(attention="blockwise", remat="full")))
    out = bench.run(bench.tiny, {"1x256": bench.SMALL_SHAPES["1x256"]}, variants=variants)
    printed = capsys.readouterr().out
    assert "| 1x256 | blockwise, scan, remat full |" in printed and "head only" in printed
    (_, today), (_, efficient), (label, head) = out["1x256"]
    assert label == "head only"
    for r in (today, efficient, head):
        assert r["total"] > 0 and r["compile_s"] > 0
        assert r["total"] <= r["temp"] + r["args"] + r["out"] + 1e-9
    # the parameters + AdamW state are the same; only temporaries shrink
    assert math.isclose(efficient["args"], today["args"], rel_tol=1e-6)
    assert efficient["temp"] < today["temp"]


@pytest.mark.slow
def test_train_memory_head_table_small(capsys):
    """The plain-vs-fused head rows: same parameters / state, the fused step has fewer temps."""
    bench = _load_bench("train_memory")
    cfg = lambda **kw: bench.tiny(vocab_size=8192, num_layers=1, head_token_chunk=32, **kw)
    out = bench.run_head(cfg, {"1x256": bench.SMALL_SHAPES["1x256"]}, methods=("dppo_full_tv",))
    printed = capsys.readouterr().out
    assert "| 1x256 | dppo_full_tv | fused |" in printed
    assert "| 1x256 | dppo_full_tv | loss-fused |" in printed
    for method in ("dppo_full_tv",):
        plain, fused, lfused = out["1x256"][method]
        for r in (fused, lfused):
            assert math.isclose(r["args"], plain["args"], rel_tol=1e-6)
            # the plain step holds >= one [192, 8192] float32 logits array; the fused ones not
            assert plain["temp"] - r["temp"] > 192 * 8192 * 4 / 2 ** 30, (method, plain, r)


@pytest.mark.slow
def test_train_memory_micro_table_small(capsys):
    """train.microbatches rows: 4 micro-batches of 4 sequences hold fewer temporaries than one
    pass over 16 (same parameters and state)."""
    bench = _load_bench("train_memory")
    cfg = lambda **kw: bench.tiny(num_layers=1, **kw)
    out = bench.run_micro(cfg, {"16x64": (16, 32, 32)}, counts=(1, 4, 3))  # 3 does not divide
    printed = capsys.readouterr().out
    assert "| 16x64 | 4 |" in printed and "| 16x64 | 3 |" not in printed
    one, four = out["16x64"][1], out["16x64"][4]
    assert math.isclose(four["args"], one["args"], rel_tol=1e-6)
    assert four["temp"] < one["temp"], (one, four)


@pytest.mark.slow
def test_vocab_head_quick(capsys):
    """benchmarks/vocab_head.py --quick: the fused head's temporaries are a fraction of the
    plain head's at 1,024 tokens (chunks of 128), and both are timed."""
    bench = _load_bench("vocab_head")
    out = bench.main(["--quick", "--repeats=1"])
    printed = capsys.readouterr().out
    assert "| 32 | 1024 | full |" in printed and "fused / plain" in printed
    for r in out["memory"]:
        if r["t"] == 1024:
            assert r["fused"] < r["plain"] / 3, r
    assert len(out["time"]) == 4 and all(r["plain"] > 0 and r["fused"] > 0 and r["loss_fused"] > 0
                                         for r in out["time"])
    assert all(r["loss_fused"] < r["plain"] / 3 for r in out["memory"] if r["t"] == 1024)


@pytest.mark.slow
def test_gpu_check_quick_cpu(capsys):
    """benchmarks/gpu_check.py --quick runs on CPU; the torch side is skipped cleanly if absent."""
    bench = _load_bench("gpu_check")
    out = bench.main(["--quick"])
    printed = capsys.readouterr().out
    assert "| batch x length | trustrl tok/s |" in printed and "train step 1 x (32 + 64)" in printed
    assert len(out["rows"]) == 2
    for row in out["rows"]:
        assert row["trustrl"]["tok_s"] > 0 and 0 < row["mfu"] < 1
        if row["torch"] is None:
            assert "torch reference skipped" in printed
        else:
            assert row["torch"]["tok_s"] > 0
    assert out["memory"]["temp"] > 0
    assert set(out["rollout"]) == {("bfloat16", 0), ("bfloat16", 20), ("int8", 20), ("fp8", 20)}
    assert all(v > 0 for v in out["rollout"].values()) and "K=20 int8" in printed
    assert set(out["head"]) == {"plain", "fused", "loss_fused"} and "vocab head" in printed
    assert "MoE layer 64 tokens" in printed and out["moe"]["trustrl"]["blocked"] > 0
    assert out["moe"]["torch"] is None or out["moe"]["torch"] > 0


@pytest.mark.slow
def test_moe_layer_quick(capsys):
    """benchmarks/moe_layer.py --quick: the four rows, ratios against the dense MLP (the script
    itself checks the grouped matmuls' gradients against the one-hot reference)."""
    rows = _load_bench("moe_layer").main(["--quick", "--repeats", "1"])
    printed = capsys.readouterr().out
    assert "| layer (fwd + bwd) | ms | vs dense MLP |" in printed
    names = [r[0] for r in rows]
    assert names == ["ragged (blocked)", "ragged (ragged_dot)", "dense MLP (same active params)",
                     "one-hot reference"]
    assert all(ms > 0 for _, ms, _ in rows) and rows[2][2] == 1.0


@pytest.mark.slow
def test_lora_quick(capsys):
    """benchmarks/lora.py --quick: the memory rows (full vs LoRA on a bf16 / int8 base; the LoRA
    step's jaxpr has no weight gradient but the fused vocab head's dead one), the train-step,
    merge and decode timings on tiny shapes."""
    out = _load_bench("lora").main(["--quick", "--repeats", "1"])
    printed = capsys.readouterr().out
    assert "| model | tokens | step |" in printed and "| weights | ms | x merged |" in printed
    memory = {r["variant"]: r for r in out["memory"]}
    assert list(memory) == ["full", "LoRA bf16", "LoRA int8"]
    assert memory["full"]["ratio_sum"] == 1.0 and memory["full"]["jaxpr_weight_dots"] >= 5
    assert memory["LoRA int8"]["args"] < memory["LoRA bf16"]["args"] < memory["full"]["args"]
    assert memory["LoRA bf16"]["jaxpr_weight_dots"] <= 2  # the head's dW (XLA removes it)
    assert [r["variant"] for r in out["time"]] == ["full", "LoRA r32"]
    assert [r["variant"] for r in out["merge"]] == ["full: cast", "LoRA r32: merge + cast"]
    assert [r["variant"] for r in out["decode"]] == ["merged", "unmerged LoRA"]
    assert out["decode"][0]["max_logit_diff"] < 0.1  # the same model, bf16 rounding apart
    assert all(r["ms"] > 0 for part in ("time", "merge", "decode") for r in out[part])


@pytest.mark.slow
def test_rollout_head_quick(capsys):
    """benchmarks/rollout_head.py --quick: three rollout precisions measured against the fp32
    trainer; the fp32 rollout is the floor of the mismatch."""
    out = _load_bench("rollout_head").main(["--quick"])
    assert "vs bf16 head" in capsys.readouterr().out
    assert [(r["dtype"], r["head"]) for r in out] == [("bfloat16", "bfloat16"),
                                                      ("bfloat16", "float32"),
                                                      ("float32", "float32")]
    assert all(r["tokens"] == 4 * 2 * 8 and r["tok_s"] > 0 for r in out)
    fp32, bf16 = out[2]["rollout/mismatch_mean"], out[0]["rollout/mismatch_mean"]
    assert fp32 < bf16 / 10, (fp32, bf16)


@pytest.mark.slow
def test_rollout_engine_and_topk_record_quick(capsys):
    """benchmarks/rollout_engine.py --quick: every variant generates the same tokens (checked
    inside), and every table prints; topk_record's chunked top-K is exact."""
    out = _load_bench("rollout_engine").main(["--quick"])
    printed = capsys.readouterr().out
    assert {"mix", "topk", "decode", "quant"} <= set(out)
    assert "continuous, 4 slots" in printed and "Table 4: rollout precision" in printed
    assert all(v > 0 for v in out["mix"].values())
    rows = _load_bench("topk_record").main(["--quick"])
    assert all(exact for _, _, exact, _ in rows)


@pytest.mark.slow
def test_pod_memory_table_from_a_real_aot_check_run(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "trustrl_bench_pod_memory", BENCH.parent / "pod_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "ENTRIES", {"tiny-cpu": (
        "tiny config on 8 CPU devices", ["--config=configs/default.py:tiny", "--topology=cpu:8",
                                         "--phases=init,train", "--hbm_gib=1",
                                         "--config.rollout.keep_kv_cache=true"])})
    bench.main(["--results", str(tmp_path), "--out", str(tmp_path)])
    doc = (tmp_path / "pod_memory.md").read_text()
    assert doc.startswith("# Pod memory per chip (generated by benchmarks/pod_memory.py")
    assert "### tiny config on 8 CPU devices" in doc
    assert "python -m trustrl.tools.aot_check --config=configs/default.py:tiny" in doc
    assert "jax 0." in doc and "commit " in doc
    rows = [line for line in doc.splitlines() if line.startswith(("| init", "| train"))]
    assert len(rows) == 2 and all(line.endswith("| yes |") for line in rows), rows
    assert "Whole-iteration peak" in doc and "fits." in doc
    assert "Held beside each program (GiB per chip): train: rollout sampler's KV cache" in doc


@pytest.mark.slow
def test_multiturn_quick(capsys):
    """benchmarks/multiturn.py --quick: goal 1's rows (single-turn baselines, multi-turn) with
    finite positive ratios, and goal 2: every episode processed exactly its prompt + trajectory
    (the script asserts it too), fewer tokens than a re-prefilling implementation."""
    outs = _load_bench("multiturn").main(["--quick"])
    printed = capsys.readouterr().out
    assert "| limits | rollout | policy tokens | loop steps | host round trips |" in printed
    assert "processed == prompt + trajectory for all 8 episodes: True" in printed
    (out,) = outs
    rows = {r["rollout"]: r for r in out["rows"]}
    assert list(rows) == ["single-turn, same policy tokens", "single-turn, same loop steps",
                          "multi-turn"]
    assert rows["single-turn, same policy tokens"]["ratio"] == 1.0
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rows.values())
    mt = rows["multi-turn"]
    assert mt["steps"] == out["counts"].steps == rows["single-turn, same loop steps"]["steps"]
    assert mt["exits"] == out["counts"].exits >= 2  # one host round trip per turn end at least
    ep = out["episodes"]
    assert (ep["processed"] == ep["prompt"] + ep["trajectory"]).all()
    assert ep["turns"].max() > 1 and (ep["naive"] >= ep["processed"]).all()
    assert math.isfinite(out["naive_ratio"]) and out["naive_ratio"] > 1
    assert f"{out['naive_ratio']:.2f}x |" in printed


@pytest.mark.slow
def test_cache_writes_quick(capsys):
    """benchmarks/cache_writes.py --quick: the single- and multi-turn bf16 rollouts with float
    writes and with bit copies give the same tokens, log-probs and top-K (the script compares
    them), with finite positive times."""
    rows = _load_bench("cache_writes").main(["--quick"])
    printed = capsys.readouterr().out
    assert "| model | workload | float writes s | bit copies s | speed-up |" in printed
    assert [r["workload"].split(",")[0] for r in rows] == ["single-turn", "multi-turn 2"]
    for r in rows:
        assert r["same"] is True, r
        assert math.isfinite(r["floats"]) and r["floats"] > 0 and r["bits"] > 0


def test_reward_model_quick(capsys):
    """benchmarks/reward_model.py --quick: the three rows (the trainer's scoring pass, the reward
    model's program, its end-to-end call) with finite positive ratios; the script checks that the
    end-to-end scores equal the program's (re-templating and packing change nothing)."""
    rows = _load_bench("reward_model").main(["--quick"])
    printed = capsys.readouterr().out
    assert "| pass | tokens | best ms | tokens/s | x score pass |" in printed
    assert [r["pass"] for r in rows] == ["score pass", "RM, program", "RM, end to end"]
    assert rows[0]["ratio"] == 1.0
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["tokens"] > 0 for r in rows)
    assert rows[1]["tokens"] == rows[2]["tokens"]


def test_mismatch_dial_quick(capsys):
    """benchmarks/mismatch_dial.py --quick: the dial's sampler variants run, and the rescored
    mu (a second trainer forward) equals pi bitwise while the fp32 sampler's does not have to."""
    bench = _load_bench("mismatch_dial")
    out = bench.main(["--quick"])
    assert out["rescored_gap"] == 0.0
    assert math.isfinite(out["sampler_gap"]) and out["sampler_gap"] < 1e-4
    assert all(math.isfinite(t) and t > 0 for t in out["times"].values())
    assert "| rescored (trainer forward) | 0.000e+00 |" in capsys.readouterr().out


def test_async_rl_quick(capsys):
    """benchmarks/async_rl.py --quick runs both modes and prints its table (the speed-up is the
    benchmark's number, not asserted)."""
    bench = _load_bench("async_rl")
    row = bench.main(["--quick"])["balanced"]
    assert all(math.isfinite(v) and v > 0 for k, v in row.items() if not k.startswith("err")), row
    assert "| balanced (0.30 / 0.30) |" in capsys.readouterr().out


def test_async_rl_model_by_hand(capsys):
    """The iteration-time models of benchmarks/async_rl.py on hand-computed phases."""
    bench = _load_bench("async_rl")
    # rollout 1.2 s of which sampling 1.0, train 0.5: sequential 1.7; overlapped: the sampler
    # (1.0) is the bottleneck, not the trainer's 0.2 + 0.5
    assert bench.predict({"A": 1.2, "S": 1.0, "B": 0.5}) == (1.7, 1.0)
    assert bench.predict({"A": 1.2, "S": 1.0, "B": 0.9}) == (2.1, pytest.approx(1.1))
    # the pod model: rollout 600 s (half of it tail) + train 400 s on the slice; split in half:
    # the sampler 600 x (0.5 / 0.5 + 0.5) = 900, the trainer 400 / 0.5 + 2 (sync) = 802
    assert bench.pod_iteration(600.0, 400.0, 0.5, 0.5, 2.0) == 900.0
    assert bench.pod_iteration(600.0, 400.0, 0.0, 0.5, 2.0) == 1200.0  # no tail: no gain
    rows = bench.main(["--pod"])
    assert "| 1 | 0.5 | 1.00x | 13/32 | 1.16x |" in capsys.readouterr().out
    assert all(r["best"] >= r["half"] for r in rows)
