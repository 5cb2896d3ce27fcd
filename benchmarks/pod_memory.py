r"""Regenerates docs/pod_memory.md: what each pod config needs per chip, phase by phase, compiled
for its TPU topology from this CPU machine by trustrl.tools.aot_check (libtpu's compile-only
devices; nothing runs on a TPU).

    make .venv/libtpu/.installed     # the libtpu the installed jax pins (0.0.42.1 for 0.10.2)
    PYTHONPATH=.venv/libtpu python benchmarks/pod_memory.py [--only NAME ...] [--out docs]

Each entry is one aot_check run (minutes on 2 cores: the 16k-token programs are large); its JSON
goes to --results (kept, so entries can be run one at a time) and the document is written from
every JSON there, each table with the commit, the command and the jax / libtpu versions that
produced it. A figure of a config that changed since must be regenerated, not edited.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (what it is, aot_check arguments)
ENTRIES = {
    "qwen3-8b-v5p": (
        "Qwen3-8B, the paper's 1,024 prompts x (512 + 16,384) tokens per minibatch "
        "(configs/qwen3_tpu.py as it is: score pass and evaluation on), v5p-64",
        ["--config=configs/qwen3_tpu.py", "--topology=v5p:2x4x4"]),
    "qwen3-32b-v5p-256rows": (
        "Qwen3-32B with the same settings but rollout.max_rows = 256, v5p-64",
        ["--config=configs/qwen3_tpu.py", "--topology=v5p:2x4x4", "--model=qwen3-32b",
         "--config.rollout.max_rows=256"]),
    # issue 25's goal: the continuous sampler's temporaries <= 1.2x the split-call sampler's at
    # the same slots (its refill once copied every layer's cache)
    "qwen3-0.6b-continuous": (
        "The rollout sampler alone, Qwen3-0.6B, 4,096 rows x (512 + 2,048) through 512 "
        "continuous slots (the default), v5p-64",
        ["--config=configs/qwen3_tpu.py", "--topology=v5p:2x4x4", "--model=qwen3-0.6b",
         "--phases=rollout", "--config.rollout.max_new_tokens=2048"]),
    "qwen3-0.6b-split": (
        "The same rows as 8 split calls of 512 rows (rollout.continuous = False)",
        ["--config=configs/qwen3_tpu.py", "--topology=v5p:2x4x4", "--model=qwen3-0.6b",
         "--phases=rollout", "--config.rollout.max_new_tokens=2048",
         "--config.rollout.continuous=false"]),
    "qwen3-8b-v6e": (
        "Qwen3-8B at 1,024 + 8,000 tokens, v6e-32 (32 GiB chips): 128 rollout slots, "
        "128 micro-batches",
        ["--config=configs/qwen3_tpu.py", "--topology=v6e:4x8", "--prompt_len=1024",
         "--config.rollout.max_new_tokens=8000", "--config.rollout.max_rows=128",
         "--config.train.microbatches=128"]),
}


def run(name: str, results: str) -> dict:
    _, args = ENTRIES[name]
    out = os.path.join(results, f"{name}.json")
    cmd = [sys.executable, "-m", "trustrl.tools.aot_check", *args, f"--json={out}"]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = [line for line in done.stdout.splitlines() if line.startswith("  ")]
    print(f"{name}: exit {done.returncode} in {time.time() - t0:.0f} s\n  " + "\n  ".join(tail))
    if done.returncode not in (0, 1) or not os.path.exists(out):  # 1: does not fit (a result)
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name}: aot_check failed")
    with open(out) as f:
        result = json.load(f)
    result.update(commit=_commit(), command="python -m trustrl.tools.aot_check " + " ".join(args),
                  date=time.strftime("%Y-%m-%d"), wall_s=round(time.time() - t0))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def _commit() -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "trustrl", "configs"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return sha + ("+uncommitted" if dirty else "")


def _num(x, fmt="{:.2f}") -> str:
    return "-" if x is None else ("refused" if x == float("inf") else fmt.format(x))


def table(name: str, r: dict) -> str:
    what, _ = ENTRIES.get(name, (name, []))
    v = r["versions"]
    lines = [f"### {what}", "",
             f"`{r['command']}`: commit {r['commit']}, jax {v['jax']} + libtpu {v['libtpu']}, "
             f"{r['date']}, {r['wall_s']} s on this 2-core VM. {r['topology']} ({r['chips']} "
             f"chips), mesh {r['mesh']}, model {r['model']}; the compiler's limit "
             f"{r['hbm_gib']} GiB per chip.", "",
             "Assumed: " + "; ".join(r["assumed"]), "",
             "| phase | program | args | temp | program total | held | peak | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        held = sum((row.get("held") or {}).values())
        refused = row.get("refused")
        fits = "NO (refused)" if refused else ("yes" if row["peak"] <= r["hbm_gib"] else "NO")
        lines.append(f"| {row['phase']} | {row['shape']} | {_num(row['args'])} | "
                     f"{_num(row['temp'])} | {_num(row['total'])} | {held:.2f} | "
                     f"{_num(row['peak'])} | {fits} |")
    peaks = [row["peak"] for row in r["rows"]]
    worst = r["rows"][peaks.index(max(peaks))]
    lines += ["", f"Whole-iteration peak: **{_num(max(peaks))} GiB per chip** ({worst['phase']})"
              f" of {r['hbm_gib']}: " + ("fits." if r["fits"] else "does NOT fit.")]
    held = [f"{row['phase']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["held"].items())
            for row in r["rows"] if row.get("held")]
    if held:
        lines += ["", "Held beside each program (GiB per chip): " + "; ".join(held) + "."]
    refused = [f"{row['phase']}: {row['refused']}" for row in r["rows"] if row.get("refused")]
    if refused:
        lines += ["", "Refused by the compiler: " + "; ".join(refused)]
    return "\n".join(lines) + "\n"


HEADER = """# Pod memory per chip (generated by benchmarks/pod_memory.py; do not edit)

Each table is one `trustrl.tools.aot_check` run: the programs `trustrl.main` runs (init, the
rollout sampler, the score pass, the train step, evaluation's greedy and pass@k samplers),
compiled for the named TPU topology from a CPU machine with libtpu's compile-only devices,
with the kernels the pod resolves ("auto" attention = splash inside a shard_map). "program
total" is XLA's memory analysis of the compiled program (arguments + outputs + temporaries -
donated); "held" is what the run keeps on the chip beside it (the train state while sampling;
the optimizer state, the rollout params and the iteration's batch, and with
rollout.keep_kv_cache the rollout sampler's KV cache, during the score pass and the train step),
counted from the same abstract arrays; "peak" is their sum. GiB per chip. Rerun
`PYTHONPATH=.venv/libtpu python benchmarks/pod_memory.py` after any change to a config, a kernel
or the model.
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=sorted(ENTRIES), help="entries to (re)run")
    p.add_argument("--results", default=os.path.join(REPO, "workdirs", "pod_memory"))
    p.add_argument("--out", default=os.path.join(REPO, "docs"))
    p.add_argument("--render", action="store_true", help="only rewrite the document")
    a = p.parse_args(argv)
    os.makedirs(a.results, exist_ok=True)
    if not a.render:
        for name in a.only or list(ENTRIES):
            run(name, a.results)
    parts = [HEADER]
    for name in ENTRIES:
        path = os.path.join(a.results, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                parts.append(table(name, json.load(f)))
    with open(os.path.join(a.out, "pod_memory.md"), "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {os.path.join(a.out, 'pod_memory.md')} ({len(parts) - 1} tables)")


if __name__ == "__main__":
    main()
