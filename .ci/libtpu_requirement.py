"""Prints the libtpu requirement of the installed jax's `tpu` extra (e.g. libtpu==0.0.42.*), the
libtpu that compiles for TPU topologies with this jax (make test installs it for the TPU compile
checks; launch/tpu_pod.sh installs the same pair on a pod)."""
import importlib.metadata
import re
import sys

for req in importlib.metadata.requires("jax") or []:
    name, _, marker = req.partition(";")
    if re.match(r"\s*libtpu\b", name) and re.search(r"extra\s*==\s*['\"]tpu['\"]", marker):
        print(name.strip().replace(" ", ""))
        sys.exit(0)
sys.exit(f"jax {importlib.metadata.version('jax')} names no libtpu in its 'tpu' extra")
