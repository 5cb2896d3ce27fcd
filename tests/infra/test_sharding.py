"""Mesh helper and the logical axis rules table."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from trustrl.infra import sharding


def test_auto_fill_and_shapes():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh([1, -1, 1]).shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("axes,msg", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one mesh axis may be -1"),
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices, have 8"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "not divisible"),
    ({"data": 8, "model": 1}, "mesh axes must be exactly"),
    ({"data": 0, "fsdp": 1, "tensor": 8}, "positive or -1"),
])
def test_errors(axes, msg):
    with pytest.raises(ValueError, match=msg):
        sharding.make_mesh(axes)


def test_logical_rules():
    assert sharding.logical_to_spec(("batch", "length", "vocab")) == P(("data", "fsdp"), None,
                                                                       "tensor")
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    # a mesh axis is used at most once per array
    assert sharding.logical_to_spec(("vocab", "heads")) == P("tensor", None)
    with pytest.raises(ValueError, match="unknown logical axis 'vocabulary'"):
        sharding.logical_to_spec(("vocabulary",))
