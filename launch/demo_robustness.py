r"""Seed / code-path study of the demo recipe (configs/default.py): does it improve robustly?

    python launch/demo_robustness.py --workdir=workdirs/robust [--parallel=2] [--rl_seeds=0,1,2] \
        [--warmstart_seeds=0,1] [--xla=fastmath,sse4] [--table_only] [-- --config.x=y ...]

Runs ``python -m trustrl.main --config=configs/default.py`` for every RL seed x warm-start seed
(config fields ``seed`` and ``warmstart.seed``) and, with ``--xla``, for RL seed 0 / warm-start
seed 0 under other XLA CPU code paths (XLA_FLAGS below; each gets its own warm-start cache, so
its base is rebuilt on that code path as on another machine). Then prints a markdown table per
run (trustrl.analysis.summary: first / last 10 iterations of training reward, held-out greedy
pass@1 and
T=1 reward before RL and at the end, ± one standard error) with the mean / min / max over runs,
and writes it to WORKDIR/table.md. Runs that finished are not rerun (trustrl.main resumes).
On an idle 2-core CPU each run takes a few minutes; at most ``--parallel`` run at once.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch.sweep import run_commands, split_passthrough  # noqa: E402
from trustrl.analysis import summary  # noqa: E402
from trustrl.infra.metrics import read_jsonl  # noqa: E402

# emulated machines: flags that change XLA's CPU code generation (each accepted by jaxlib 0.10)
XLA_VARIANTS = {
    "fastmath": "--xla_cpu_enable_fast_math=true",  # reassociated / approximate float math
    "sse4": "--xla_cpu_max_isa=SSE4_2",  # 128-bit vectors instead of AVX2 / AVX-512
}


def run_specs(rl_seeds, ws_seeds, xla, workdir):
    """[(name, extra env, overrides)] for the study."""
    specs = [(f"ws{w}_seed{s}", {}, [f"--config.seed={s}", f"--config.warmstart.seed={w}"])
             for w in ws_seeds for s in rl_seeds]
    for name in xla:
        if name not in XLA_VARIANTS:
            raise SystemExit(f"unknown --xla variant {name!r}; valid: {sorted(XLA_VARIANTS)}")
        cache = os.path.join(workdir, f"cache_{name}")
        specs.append((f"xla_{name}_ws0_seed0", {"XLA_FLAGS": XLA_VARIANTS[name]},
                      ["--config.seed=0", "--config.warmstart.seed=0",
                       f"--config.warmstart.cache_dir={cache}"]))
    return specs


def commands(specs, workdir, passthrough=()):
    out = []
    for name, env, overrides in specs:
        prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        out.append(prefix + [sys.executable, "-m", "trustrl.main", "--config=configs/default.py",
                             f"--workdir={os.path.join(workdir, name)}",
                             "--config.log.progress=False", *overrides, *passthrough])
    return out


COLUMNS = ("reward first 10", "reward last 10", "greedy pass@1 before", "greedy pass@1 after",
           "T=1 reward before", "T=1 reward after")


def run_row(s: dict) -> list[float]:
    """The table's numbers for one run's summary (NaN where an eval is missing)."""
    t, e = s["train"], s["eval"]
    out = [t["first"]["value"], t["last"]["value"]]
    for key in ("eval/pass@1", "eval/sampled_reward_mean"):
        if key in e and e[key]["before"]["step"] == 0:
            out += [e[key]["before"]["value"], e[key]["after"]["value"]]
        else:
            out += [np.nan, np.nan]
    return out


def table(names, rows) -> str:
    head = "| run | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in zip(names, rows):
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    if len(rows) > 1:
        a = np.asarray(rows, dtype=float)
        for stat, f in (("mean", np.nanmean), ("min", np.nanmin), ("max", np.nanmax)):
            lines.append(f"| **{stat}** | " + " | ".join(f"{v:.3f}" for v in f(a, 0)) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--rl_seeds", default="0,1,2")
    p.add_argument("--warmstart_seeds", default="0,1")
    p.add_argument("--xla", default="", help=f"comma-separated of {sorted(XLA_VARIANTS)}")
    p.add_argument("--table_only", action="store_true", help="summarise the finished runs only")
    a = p.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x]
    specs = run_specs(ints(a.rl_seeds), ints(a.warmstart_seeds),
                      [x for x in a.xla.split(",") if x], a.workdir)
    if not a.table_only:
        failed = run_commands(commands(specs, a.workdir, passthrough), a.parallel)
        if failed:
            print(f"{len(failed)} run(s) failed; see their log.txt: {failed}")
    names, rows = [], []
    for name, _, _ in specs:
        path = os.path.join(a.workdir, name, "metrics.jsonl")
        if not os.path.exists(path):
            print(f"not in the table (no metrics yet): {name}")
            continue
        try:
            row = run_row(summary.summarize(read_jsonl(path)))
        except ValueError as e:  # a run still at its step-0 eval
            print(f"not in the table: {name}: {e}")
            continue
        names.append(name)
        rows.append(row)
    text = table(names, rows)
    print(text)
    with open(os.path.join(a.workdir, "table.md"), "w") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
