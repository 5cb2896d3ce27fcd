"""Smoke tests of the benchmarks: their --quick modes on tiny sizes (no timing asserts)."""
import importlib.util
import math
import pathlib

import pytest

from trustrl import losses

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "loss_overhead.py"


def _load():
    spec = importlib.util.spec_from_file_location("trustrl_bench_loss_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_rollout_throughput_quick_tiny(capsys):
    """benchmarks/rollout_throughput.py --quick: tiny config, 8 new tokens, one batch of 2."""
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
