"""Executes the notebooks headless (nbclient) so they cannot rot, and checks what they find.

The kernel is started from a throw-away kernelspec whose argv is this interpreter
(``sys.executable -m ipykernel_launcher``), so the test needs neither ``python -m ipykernel
install`` nor a ``python`` on PATH that has trustrl: it works in a fresh CI virtualenv. The kernel
inherits this process's environment (XLA_FLAGS from conftest: 8 simulated CPU devices).
"""
import json
import pathlib
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
RESULTS_PREFIX = "TRUSTRL_NOTEBOOK_RESULTS="
KERNEL_NAME = "trustrl-test-python3"


def _kernel_manager(tmp_path):
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (trustrl tests)",
        "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def _execute(path, tmp_path, timeout=300):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=timeout, allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _results(nb):
    text = "".join(o.get("text", "") for o in _outputs(nb) if o.output_type == "stream")
    lines = [l for l in text.splitlines() if l.startswith(RESULTS_PREFIX)]
    assert len(lines) == 1, "final cell did not print its results"
    return json.loads(lines[0][len(RESULTS_PREFIX):])


def _images(nb):
    return [o for o in _outputs(nb) if o.output_type == "display_data" and "image/png" in o.data]


@pytest.mark.parametrize("name,install_var", [
    ("trust_region_geometry", "TRUSTRL_PIP_SPEC"), ("quickstart", "TRUSTRL_REPO"),
    ("compare_methods", "TRUSTRL_REPO"), ("real_model", "TRUSTRL_REPO")])
def test_committed_notebook_is_clean(name, install_var):
    """Outputs cleared, python3 kernelspec, valid nbformat; the Colab install cell comes first."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "notebook has no code cells"
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    # Colab install cell first, and a no-op outside Colab.
    assert "google.colab" in code[0].source and install_var in code[0].source
    if name != "trust_region_geometry":  # the small / full switch the tests below set
        assert any("TRUSTRL_NOTEBOOK_SMALL" in c.source for c in code[1:3])


@pytest.mark.slow
def test_trust_region_geometry_notebook(tmp_path):
    nb = _execute(NOTEBOOKS / "trust_region_geometry.ipynb", tmp_path)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 2, f"expected >= 2 figures, got {len(images)}"

    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    lines = [l for l in text.splitlines() if l.startswith(RESULTS_PREFIX)]
    assert len(lines) == 1, "final cell did not print its results"
    res = json.loads(lines[0][len(RESULTS_PREFIX):])
    # The paper's two worked examples (PAPER sec. 1).
    assert res["rare_up_blocked_by_ppo_clip"] and res["rare_up_kept_by_binary_tv"]
    assert res["rare_up_kept_by_binary_kl"]
    assert res["frequent_down_kept_by_ppo_clip"] and res["frequent_down_blocked_by_binary_tv"]
    assert res["frequent_down_blocked_by_binary_kl"]
    # binary <= top-K <= exact on every random sample, sharded exact == unsharded.
    assert res["ordering_tv_all"] and res["ordering_kl_all"]
    assert res["ordering_n_samples"] >= 1000
    assert res["sharded_matches_unsharded"] and res["sharded_devices"] >= 1
    assert res["proportional_move_binary_equals_exact"] and res["blocked_frac_monotone"]
    # Heat map: ratio clip blocks most rare-token increases, binary TV none.
    assert res["heat_rare_up_blocked_frac_binary_tv"] == 0.0
    assert res["heat_rare_up_blocked_frac_ppo_clip"] > 0.5


def _dppo_binary_tv_blocks(adv, logp, rollout_logp, delta_low, delta_high):
    """PAPER Eq. 12 with D = |pi - mu|, in float64 (the loss computes it in float32)."""
    pi, mu = np.exp(logp), np.exp(rollout_logp)
    d = np.abs(pi - mu)
    blocked = ((adv > 0) & (pi > mu) & (d > delta_high)) | ((adv < 0) & (pi < mu) & (d > delta_low))
    # tokens within float32 rounding of a threshold may go either way
    delta = np.where(adv > 0, delta_high, delta_low)
    return blocked, np.abs(d - delta) < 1e-5


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUSTRL_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TRUSTRL_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    nb = _execute(NOTEBOOKS / "quickstart.ipynb", tmp_path)
    assert len(_images(nb)) == 1  # the reward / mismatch / masked-fraction row
    res = _results(nb)
    assert res["method"] == "dppo_binary_tv" and res["iterations"] == 6
    assert len(res["reward"]) == 6 and all(0.0 <= r <= 1.0 for r in res["reward"])
    # bf16 rollout vs fp32 trainer at equal parameters: a real, small, finite mismatch
    mm = np.asarray(res["mismatch_mean"], float)
    assert np.all(np.isfinite(mm)) and np.all(mm > 0) and np.all(mm < 0.05), mm

    toks = res["tokens"]
    assert len(toks) >= 8, "too few tokens with a non-zero advantage to inspect"
    adv, logp, lmu = (np.asarray([t[k] for t in toks], float)
                      for k in ("adv", "logp", "rollout_logp"))
    got = np.asarray([t["blocked"] for t in toks])
    want, ambiguous = _dppo_binary_tv_blocks(adv, logp, lmu, res["delta_low"], res["delta_high"])
    assert not np.any((got != want) & ~ambiguous), np.flatnonzero(got != want)
    assert got.sum() >= 1, "the drifted batch masked nothing: the table shows no example"
    # the loss's own count agrees with the per-token report (rows are exactly the A != 0 tokens)
    assert res["loss_masked_frac"] == pytest.approx(got.mean(), abs=1e-6)
    sides = np.asarray([t["side"] for t in toks])
    np.testing.assert_array_equal(sides[got], np.where(adv[got] > 0, "high", "low"))
    assert not sides[~got].any()


def _binary_kl64(logp, rollout_logp):
    """Binary KL(mu || pi) (PAPER Eq. 14) in float64."""
    pi, mu = np.exp(logp), np.exp(rollout_logp)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = mu * (rollout_logp - logp) + (1 - mu) * (np.log1p(-mu) - np.log1p(-pi))
    return np.maximum(np.nan_to_num(kl, nan=0.0), 0.0)


@pytest.mark.slow
def test_compare_methods_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUSTRL_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TRUSTRL_NOTEBOOK_OUT", str(tmp_path / "out"))
    nb = _execute(NOTEBOOKS / "compare_methods.ipynb", tmp_path)
    assert len(_images(nb)) == 2  # the curves grid and the delta sweep
    res = _results(nb)
    assert res["runs"] == ["dppo_binary_tv_seed0", "grpo_clip_higher_seed0", "pg_is_seed0"]
    assert {"reward/mean", "rollout/mismatch_mean", "loss/masked_frac"} <= set(res["curves"])
    deltas = np.asarray(res["deltas"])
    assert np.all(np.diff(deltas) > 0)
    assert res["max_abs_diff_direct"] < 1e-6  # the notebook's own check (one token = 1/n)

    # Recompute every DPPO sweep from the saved batch, independently of trustrl.
    b = dict(np.load(res["batch_path"]))
    adv = np.broadcast_to(b["advantages"][:, None], b["logp"].shape)
    nonzero = (b["response_mask"] > 0) & (adv != 0)
    assert nonzero.sum() == res["n_tokens"] >= 8
    lp, lmu = b["logp"].astype(np.float64), b["rollout_logp"].astype(np.float64)
    div = {"dppo_binary_tv": np.abs(np.exp(lp) - np.exp(lmu)),
           "dppo_binary_kl": _binary_kl64(lp, lmu)}
    div.update({f"dppo_{k}": b[k].astype(np.float64)
                for k in ("topk_tv", "topk_kl", "full_tv", "full_kl")})
    # binary <= top-K: both from the sampler's records of mu (exact recomputes mu's logits, so
    # it can sit within the bf16 recompute noise of top-K; real_model checks the full chain)
    for kind in ("tv", "kl"):
        bi, tk = div[f"dppo_binary_{kind}"][nonzero], div[f"dppo_topk_{kind}"][nonzero]
        assert np.all(bi <= tk + 1e-5 + 1e-4 * tk), kind
    away = ((adv > 0) & (lp > lmu)) | ((adv < 0) & (lp < lmu))
    for method, d in div.items():
        got = np.asarray(res["masked_frac"][method])
        assert np.all(np.diff(got) <= 0), (method, got)  # monotone non-increasing in delta
        for delta, frac in zip(deltas, got):
            blocked = (away & (d > delta) & nonzero).sum()
            ambiguous = (away & nonzero & (np.abs(d - delta) < 1e-5)).sum()
            assert abs(frac * nonzero.sum() - blocked) <= ambiguous + 1e-3, (method, delta)
    # the sweep is informative: the drift makes every DPPO mask block tokens at the smallest delta
    assert all(res["masked_frac"][m][0] > 0 for m in div), res["masked_frac"]


@pytest.mark.optimized  # execution-bound: compiled at XLA's default level
@pytest.mark.slow
def test_real_model_notebook(tmp_path, monkeypatch, smollm2_dir):
    monkeypatch.setenv("TRUSTRL_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TRUSTRL_SMOLLM2_DIR", str(smollm2_dir))
    nb = _execute(NOTEBOOKS / "real_model.ipynb", tmp_path)
    assert len(_images(nb)) == 1
    res = _results(nb)
    assert res["model_dir"] == str(smollm2_dir) and res["k"] == 20
    assert res["n_tokens"] >= 8  # 2 prompts x 2 samples, up to 8 new tokens each
    assert set(res["estimates"]) == {"fp32 trainer (same params)", "perturbed params (0.02 std)"}
    for name, est in res["estimates"].items():
        for kind in ("tv", "kl"):
            b, t, f = (np.asarray(est[f"{e}_{kind}"]) for e in ("binary", "topk", "full"))
            assert b.shape == t.shape == f.shape == (res["n_tokens"],)
            assert np.all(np.isfinite(b) & np.isfinite(t) & np.isfinite(f)), (name, kind)
            assert np.all(b >= 0), (name, kind)
            # float32 sums over the 49,152-token vocabulary: ~1e-6 absolute rounding seen on
            # jax 0.12's CPU code (binary KL of a near-zero move exceeded exact KL by 1.3e-6)
            tol = lambda x: 5e-6 + 1e-4 * np.abs(x)
            assert np.all(b <= t + tol(t)), (name, kind, np.max(b - t))
            assert np.all(t <= f + tol(f)), (name, kind, np.max(t - f))
            if kind == "tv":
                assert np.all(f <= 1 + 1e-6)
    same = np.asarray(res["estimates"]["fp32 trainer (same params)"]["full_tv"])
    moved = np.asarray(res["estimates"]["perturbed params (0.02 std)"]["full_tv"])
    # bf16 vs fp32 at equal parameters is a real but small mismatch; the perturbation is larger
    assert 0 < same.mean() < 0.05 and moved.mean() > same.mean(), (same.mean(), moved.mean())
    rec = {k: np.asarray(v) for k, v in res["recorded"].items()}
    assert np.all(np.isfinite(rec["binary_tv"])) and np.all(
        rec["binary_tv"] <= rec["topk_tv"] + 1e-6 + 1e-4 * rec["topk_tv"])
    assert 0 <= res["decode_vs_recomputed_mu_max"] < 0.2


@pytest.mark.slow
def test_multiturn_notebook(tmp_path):
    path = NOTEBOOKS / "multiturn.ipynb"
    committed = nbformat.read(path, as_version=4)
    nbformat.validate(committed)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert committed.metadata["kernelspec"]["name"] == "python3"
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "google.colab" in code[0].source and "TRUSTRL_REPO" in code[0].source
    nb = _execute(path, tmp_path)
    pages = [o.data["text/html"] for o in _outputs(nb)
             if o.output_type == "display_data" and "text/html" in o.data]
    assert len(pages) == 2 and all("trustrl-policy" in p and "trustrl-observation" in p
                                   for p in pages)
    res = _results(nb)
    assert res["env_id"] == "trustrl:guess_sum" and res["episodes"] == 4
    assert res["turn_ends"]["end_of_turn"] > 0  # the warm-started model ends turns itself
    assert res["row_num_turns"] >= 2 and res["n_observation_tokens"] > 0
    assert res["n_policy_tokens"] == res["row_response_mask_sum"] == len(res["tokens"]) > 0
    assert (res["n_policy_tokens"] + res["n_observation_tokens"] + res["n_template_tokens"]
            == res["row_trajectory_len"])
    # the rendering shows every policy token once; the dropped ones are exactly the mask's
    assert res["html_policy_spans"] == res["n_policy_tokens"]
    assert res["html_dropped_spans"] == res["n_dropped"]
    assert res["html_out_spans"] == (res["n_prompt_tokens"] + res["n_observation_tokens"]
                                     + res["n_template_tokens"])
    # token-in-token-out: every fed observation is the environment's reply, rendered and encoded
    assert res["observations_match"] and res["observations_checked"] >= 1
    assert res["mu_recompute_max_abs"] < 1e-4  # the trainer's forward gives back mu at mu
    assert 0 < res["masked_frac"] < 1
    assert res["loss_masked_frac"] == pytest.approx(res["masked_frac"], abs=1e-6)
    toks = res["tokens"]
    logp, lmu = (np.asarray([t[k] for t in toks], float) for k in ("logp", "rollout_logp"))
    got = np.asarray([t["dropped"] for t in toks])
    want, ambiguous = _dppo_binary_tv_blocks(-np.ones(len(toks)), logp, lmu, res["delta"],
                                             res["delta"])
    assert not np.any((got != want) & ~ambiguous), np.flatnonzero(got != want)
