"""Group-baseline advantages on worked examples."""
import numpy as np
import pytest

from trustrl.core.advantages import compute_advantages


def test_group_mean_no_std_division():
    r = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = compute_advantages(r, group_size=4)
    np.testing.assert_allclose(a, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_grpo_std_normalised_and_zero_variance_group():
    r = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = compute_advantages(r, group_size=2, method="grpo")
    np.testing.assert_allclose(a, [1, -1, 0, 0, 0, 0], atol=1e-5)
    assert np.all(np.isfinite(a))


def test_rloo_leave_one_out():
    r = np.array([3.0, 1.0, 2.0])
    a = compute_advantages(r, group_size=3, method="rloo")
    np.testing.assert_allclose(a, [3 - 1.5, 1 - 2.5, 2 - 2.0], rtol=1e-6)


@pytest.mark.parametrize("kw,msg", [
    (dict(group_size=3), "not a multiple of group_size=3"),
    (dict(group_size=2, method="ppo"), "unknown advantage method 'ppo'; valid"),
    (dict(group_size=1, method="rloo"), "rloo needs group_size >= 2"),
])
def test_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        compute_advantages(np.zeros(4), **kw)
