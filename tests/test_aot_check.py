"""trustrl.tools.aot_check: per-chip memory of the run's compiled programs for a topology."""
import importlib.util
import subprocess
import sys

import ml_collections
import pytest

from configs import default, qwen3_tpu
from trustrl.tools import aot_check

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _run(args, env):
    return subprocess.run([sys.executable, "-m", "trustrl.tools.aot_check", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_topology_and_model_resolution():
    assert aot_check.parse_topology("v5p:2x4x4") == ("tpu", None, 95.0)
    assert aot_check.parse_topology("v5e:4x4") == ("tpu", None, 16.0)
    assert aot_check.parse_topology("cpu:8") == ("cpu", 8, None)
    with pytest.raises(ValueError, match="not valid: use a TPU generation"):
        aot_check.parse_topology("v9:2x2")
    cfg = qwen3_tpu.get_config()  # hf_dir /mnt/models/Qwen3-8B-Base is absent here
    hf, source = aot_check.model_hf_config(cfg, None)
    assert source == "preset qwen3-8b" and hf["hidden_size"] == 4096
    assert aot_check.model_hf_config(cfg, "qwen3-32b")[0]["num_hidden_layers"] == 64
    with pytest.raises(ValueError, match="not a preset; choose one of"):
        aot_check.model_hf_config(cfg, "gpt5")
    tiny = default.get_config("tiny")
    hf, source = aot_check.model_hf_config(tiny, None)
    assert source == "config" and hf["vocab_size"] == tiny.tokenizer.vocab_size
    # the presets are valid HF configs of the shape they name (8.2B parameters for 8B)
    from trustrl import hf as hf_lib
    from trustrl import model as model_lib
    import jax
    import numpy as np
    shapes = model_lib.param_shapes(hf_lib.config_from_hf(aot_check.MODELS["qwen3-8b"]))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert 8.1e9 < n < 8.3e9, n


@pytest.mark.slow
def test_cpu_topology_tiny_config_and_the_fit_verdict(subprocess_env):
    done = _run(["--config=configs/default.py:tiny", "--topology=cpu:8"], subprocess_env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if " | " in line]
    assert [line.split()[0] for line in table] == ["phase", "init", "train", "sampler"]
    for line in table[1:]:
        total = float(line.split("|")[4])
        assert 0 < total < 1, line  # a tiny model: well under 1 GiB per device
    # fewer sampler rows than the iteration has: the continuous-batching program is compiled
    done = _run(["--config=configs/default.py:tiny", "--topology=cpu:8", "--phases=sampler",
                 "--config.rollout.max_rows=2"], subprocess_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 rows through 2 continuous slots" in done.stdout
    # a limit nothing fits in: exit 1 naming the phases (the same verdict as report())
    done = _run(["--config=configs/default.py:tiny", "--topology=cpu:8", "--hbm_gib=1e-6",
                 "--phases=init"], subprocess_env)
    assert done.returncode == 1
    assert "init do(es) not fit in 1e-06 GiB per chip" in done.stderr


def test_report_verdict():
    rows = [dict(phase="init", shape="s", args=1.0, temp=0.0, total=3.8, compile_s=1.0),
            dict(phase="train", shape="s", args=2.9, temp=24.6, total=27.5, compile_s=86.0),
            dict(phase="sampler", shape="s", args=float("nan"), temp=313.2, total=float("inf"),
                 compile_s=57.0, refused="Ran out of memory on HBM")]
    table, verdict = aot_check.report(rows, 95.0)
    assert [line.split("|")[6].strip() for line in table.splitlines()[2:]] == ["yes", "yes", "NO"]
    assert verdict.startswith("aot_check: sampler do(es) not fit in 95 GiB per chip")
    assert aot_check.report(rows[:1], 3.0)[1].startswith("aot_check: init do(es) not fit")
    assert aot_check.report(rows[:2], None)[1] is None  # no limit (cpu:N): no verdict


@pytest.mark.parametrize("args,needle", [
    (["--topology=v9:1x1"], "is not valid: use a TPU generation"),
    (["--topology=cpu:8", "--phases=init,rollout"], "--phases: unknown ['rollout']"),
    (["--topology=cpu:8", "--config.rollout.max_rows=3"], "rollout.max_rows=3 is not divisible"),
])
def test_bad_flags_exit_2(args, needle, subprocess_env):
    done = _run(["--config=configs/default.py:tiny", *args], subprocess_env)
    assert done.returncode == 2 and needle in done.stderr, done.stderr[-2000:]


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install "
                    "'libtpu==0.0.42.*' for jax 0.10.2); the cpu:N topology is tested instead")
def test_tpu_topology_compiles_from_cpu(subprocess_env):
    done = _run(["--config=configs/default.py:tiny", "--topology=v5e:2x4"], subprocess_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(8 chips, TPU v5" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith(("init", "train",
                                                                           "sampler"))]
    assert len(rows) == 3 and all(" yes " in line for line in rows)
