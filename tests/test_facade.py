"""The package facade: trustrl's flat module names of 0.1 (../shared/DESIGN.md's contracts among
them) resolve to the layered modules, lazily, as the same module objects."""
import importlib
import subprocess
import sys

import pytest

import trustrl


def test_import_trustrl_imports_no_jax():
    code = "import sys, trustrl; print('jax' in sys.modules, len(trustrl.MOVED))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", str(len(trustrl.MOVED))]


@pytest.mark.parametrize("old,new", sorted(trustrl.MOVED.items()))
def test_every_old_name_is_its_new_module(old, new):
    module = importlib.import_module(f"trustrl.{new}")
    assert getattr(trustrl, old) is module
    assert importlib.import_module(f"trustrl.{old}") is module  # import trustrl.<old>


def test_the_design_contracts():
    from trustrl import losses
    import trustrl.train_step
    assert losses.policy_loss is importlib.import_module("trustrl.core.losses").policy_loss
    assert trustrl.train_step.train_step.__module__ == "trustrl.training.step"
    assert trustrl.divergences.full_tv.__module__ == "trustrl.core.divergences"


def test_the_old_module_names_that_became_packages():
    from trustrl import data, model, rollout
    from trustrl.model import ModelConfig
    assert ModelConfig is importlib.import_module("trustrl.model.transformer").ModelConfig
    assert model.forward_logits.__module__ == "trustrl.model.transformer"
    assert rollout.Rollout.__module__ == "trustrl.rollout.record"
    assert data.PromptIterator.__module__ == "trustrl.data.datasets"
    assert model.attention is importlib.import_module("trustrl.model.attention")  # submodules


def test_unknown_names_fail_clearly():
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        trustrl.no_such_module  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("trustrl.no_such_module")


def test_python_dash_m_runs_an_old_name():
    out = subprocess.run([sys.executable, "-m", "trustrl.summary", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "WORKDIR" in out.stdout, out.stderr[-2000:]
