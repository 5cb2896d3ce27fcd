r"""The pre-registered trust-region study (configs/trust_region_study.py; design, predictions
and verdicts in docs/trust_region_family.md): runs its sweep in priority order, then summarises.

    python launch/trust_region_study.py --workdir=workdirs/tr_study [--parallel=2] \
        [--max_runs=N] [--analyze_only] [--out=docs] [--keep=docs/trust_region_runs] [--small]

Runs already finished are skipped (a run cut short resumes from its checkpoint), so the study
can be continued over several sessions. Every finished run's config.json and metrics.jsonl
(gzipped) are archived in ``--keep`` (tracked by git: a new checkout has no workdir), and
restored from there into the workdir first, so the tables always cover every finished run;
``--max_runs`` starts at most N runs (the first N
unfinished ones in priority order). Then writes OUT/trust_region_table.md (final / best
training reward, collapse iteration, reached-0.9 iteration, held-out reward, mean and max
pi - mu, masked fraction, wall time; mean +- spread over the finished seeds of each
METHOD,DIAL,STALE), OUT/trust_region_diagnostics.md (masked fraction by advantage sign, mismatch
first / last 10 iterations, gradient norm, entropy) and OUT/trust_region_plots/*.png, with
launch/sanity.py's definitions (collapse: the 10-iteration mean falls below half its best and
stays there, with max (pi - mu) growing). ``--small``: the CI-sized variant (tiny model, 3
iterations, two runs) in WORKDIR_small.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import sanity, sweep  # noqa: E402
from trustrl.analysis import plot  # noqa: E402

CONFIG = "configs/trust_region_study.py"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="workdirs/tr_study")
    p.add_argument("--out", default="docs")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--max_runs", type=int, default=None)
    p.add_argument("--small", action="store_true", help="CI-sized variant")
    p.add_argument("--analyze_only", action="store_true")
    p.add_argument("--keep", default=None,
                   help="where finished runs are archived and restored from (default "
                        "docs/trust_region_runs; none with --small unless given)")
    p.add_argument("--cache_ready", action="store_true",
                   help="the warm start and filter are already cached (e.g. by a calibration or "
                        "a pilot): start `parallel` runs at once from the first")
    a = p.parse_args(argv)
    entries = sweep.load_sweep(CONFIG)
    variant = ""
    if a.small:
        variant = "small"
        entries = [{"config_arg": n, "seed": 0} for n in ("cppo,d3,s4", "pg_is,d0,s0")]
        a.workdir = a.workdir.rstrip("/") + "_small"
    keep = a.keep if a.keep is not None or a.small else "docs/trust_region_runs"
    if keep:
        restored = sanity.unarchive(keep, a.workdir, entries)
        if restored:
            print(f"restored {len(restored)} finished run(s) from {keep}")
    failed = []
    if not a.analyze_only:
        failed = sanity.run_missing(CONFIG, entries, a.workdir, variant, a.parallel,
                                    a.max_runs, a.cache_ready)
        if failed:
            print(f"{len(failed)} run(s) failed; see their log.txt: {failed}")
    if keep:
        kept = sanity.archive(a.workdir, entries, keep)
        if kept:
            print(f"archived {len(kept)} finished run(s) in {keep}")
    if failed:
        return 1
    os.makedirs(a.out, exist_ok=True)
    prefix = "trust_region_small" if a.small else "trust_region"
    for name, fn in (("table", sanity.table), ("diagnostics", sanity.diagnostics)):
        text = fn(a.workdir, entries)
        with open(os.path.join(a.out, f"{prefix}_{name}.md"), "w") as f:
            f.write(text)
        print(text)
    dirs = [os.path.join(a.workdir, sweep.run_name(e)) for e in entries]
    dirs = [d for d in dirs if os.path.exists(os.path.join(d, "metrics.jsonl"))]
    if dirs:
        plot.plot_runs(dirs, os.path.join(a.out, f"{prefix}_plots"), group_seeds=True, smooth=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
