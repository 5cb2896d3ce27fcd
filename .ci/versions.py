"""Prints the interpreter and the installed versions of the stack a CI leg runs on (one line)."""
import importlib.metadata
import platform

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "torch")


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


print("versions: python " + platform.python_version() + ", "
      + ", ".join(f"{name} {version(name)}" for name in PACKAGES))
