"""Executes the notebooks headless (nbclient) so they cannot rot, and checks what they find.

The kernel is started from a throw-away kernelspec whose argv is this interpreter
(``sys.executable -m ipykernel_launcher``), so the test needs neither ``python -m ipykernel
install`` nor a ``python`` on PATH that has trustrl: it works in a fresh CI virtualenv. The kernel
inherits this process's environment (XLA_FLAGS from conftest: 8 simulated CPU devices).
"""
import json
import pathlib
import sys

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


def test_committed_notebook_is_clean():
    """Outputs cleared, python3 kernelspec, valid nbformat."""
    nb = nbformat.read(NOTEBOOKS / "trust_region_geometry.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "notebook has no code cells"
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    # Colab install cell first, and a no-op outside Colab.
    assert "google.colab" in code[0].source and "TRUSTRL_PIP_SPEC" in code[0].source


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
