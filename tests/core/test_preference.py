"""Bradley-Terry loss: value and gradients against a slow float64 numpy reference, stability at
large margins, weights, accuracy with ties."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.core.preference import bradley_terry_loss


def reference(chosen, rejected, margin=None, weights=None):
    """Slow float64 reference: -log(1 / (1 + exp(-(c - r - m)))) per pair, weighted mean; the
    gradients by hand: d/dc = -w sigmoid(-(c - r - m)) / sum w, d/dr = +w sigmoid(...) / sum w."""
    n = len(chosen)
    margin = [0.0] * n if margin is None else list(np.broadcast_to(margin, (n,)))
    weights = [1.0] * n if weights is None else list(np.broadcast_to(weights, (n,)))
    total = math.fsum(weights)
    loss, grad_c = 0.0, []
    for c, r, m, w in zip(chosen, rejected, margin, weights):
        z = float(c) - float(r) - float(m)
        # log(1 + exp(-z)) without overflow: for z < 0 write it as -z + log(1 + exp(z))
        nll = -math.log(1.0 / (1.0 + math.exp(-z))) if z > -30 else -z + math.log1p(math.exp(z))
        loss += w * nll / total
        grad_c.append(-w / (1.0 + math.exp(z)) / total if z > -700 else -w / total)
    return loss, np.array(grad_c), -np.array(grad_c)


def grads(chosen, rejected, **kw):
    fn = lambda c, r: bradley_terry_loss(c, r, **kw)[0]
    return jax.grad(fn, argnums=(0, 1))(jnp.asarray(chosen, jnp.float32),
                                         jnp.asarray(rejected, jnp.float32))


CASES = [
    ([1.0, 0.0, -2.0, 3.5], [0.0, 0.0, 1.0, -1.5], None, None),
    ([1.0, 0.0, -2.0, 3.5], [0.0, 0.0, 1.0, -1.5], [0.5, 0.0, 2.0, 1.0], None),
    ([1.0, 0.0, -2.0, 3.5], [0.0, 0.0, 1.0, -1.5], 0.7, [1.0, 2.0, 0.0, 0.5]),
    # large score gaps: +-100 either way, and margins that flip a won pair into a lost one
    ([100.0, -100.0, 0.0, 50.0], [-100.0, 100.0, 0.0, 50.0], [0.0, 0.0, 100.0, -100.0], None),
]


@pytest.mark.parametrize("chosen,rejected,margin,weights", CASES)
def test_value_and_gradient_match_reference(chosen, rejected, margin, weights):
    loss, metrics = bradley_terry_loss(jnp.array(chosen), jnp.array(rejected), margin=margin,
                                       weights=weights)
    want, want_gc, want_gr = reference(chosen, rejected, margin, weights)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    assert float(metrics["bt/loss"]) == float(loss)
    gc, gr = grads(chosen, rejected, margin=margin, weights=weights)
    assert np.isfinite(np.asarray(gc)).all() and np.isfinite(np.asarray(gr)).all()
    np.testing.assert_allclose(np.asarray(gc), want_gc, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gr), want_gr, rtol=1e-5, atol=1e-7)


def test_large_margins_are_finite_and_saturate():
    # chosen far below rejected: loss ~ 200 exactly (softplus(200) = 200 + ~1e-87); gradient -1
    loss, _ = bradley_terry_loss(jnp.array([-100.0]), jnp.array([100.0]))
    assert float(loss) == pytest.approx(200.0, rel=1e-6)
    gc, gr = grads([-100.0], [100.0])
    assert float(gc[0]) == pytest.approx(-1.0) and float(gr[0]) == pytest.approx(1.0)
    # chosen far above: loss ~ exp(-200) = 0 in float32, gradient ~ 0, nothing NaN
    loss, _ = bradley_terry_loss(jnp.array([100.0]), jnp.array([-100.0]))
    assert float(loss) == pytest.approx(0.0, abs=1e-30)
    gc, _ = grads([100.0], [-100.0], margin=-100.0)
    assert np.isfinite(float(gc[0])) and abs(float(gc[0])) < 1e-30


def test_accuracy_ties_and_margin_mean():
    chosen = jnp.array([2.0, 1.0, 0.0, -1.0])
    rejected = jnp.array([1.0, 1.0, 3.0, -1.0])
    _, m = bradley_terry_loss(chosen, rejected, margin=5.0)
    # one win, two ties (0.5 each), one loss; the margin does not change the accuracy
    assert float(m["bt/accuracy"]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert float(m["bt/margin_mean"]) == pytest.approx((1 + 0 - 3 + 0) / 4)


def test_weights_mask_pairs_out():
    chosen, rejected = jnp.array([2.0, -3.0, 0.5]), jnp.array([0.0, 1.0, 0.0])
    loss_w, m_w = bradley_terry_loss(chosen, rejected, weights=jnp.array([1.0, 0.0, 1.0]))
    loss_2, m_2 = bradley_terry_loss(chosen[jnp.array([0, 2])], rejected[jnp.array([0, 2])])
    assert float(loss_w) == pytest.approx(float(loss_2), rel=1e-6)
    assert float(m_w["bt/accuracy"]) == 1.0 and float(m_2["bt/accuracy"]) == 1.0
    gc, _ = grads([2.0, -3.0, 0.5], [0.0, 1.0, 0.0], weights=[1.0, 0.0, 1.0])
    assert float(gc[1]) == 0.0
    loss_0, _ = bradley_terry_loss(chosen, rejected, weights=jnp.zeros(3))
    assert float(loss_0) == 0.0


def test_jit_and_shape_errors():
    fn = jax.jit(lambda c, r: bradley_terry_loss(c, r)[0])
    assert float(fn(jnp.array([0.0]), jnp.array([0.0]))) == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match="one shape"):
        bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))
