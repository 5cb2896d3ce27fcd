r"""The offline RLHF demo (docs/rlhf.md): train a reward model on synthetic preference pairs,
then run RL against it, and report the reward model's score AND the hidden ground truth.

    python launch/rlhf_demo.py [--workdir=workdirs/rlhf_demo] [--seed=0]
    (make rlhf-demo)

1. ``python -m trustrl.tools.train_reward_model --config=configs/reward_model.py:wordpref``:
   a fresh 2-layer decoder learns, from pairs of random word lists labelled by a hidden rule
   (trustrl.data.preferences, "wordpref"), which responses are preferred; its held-out pair
   accuracy is printed. Skipped when WORKDIR/rm/hf exists.
2. ``python -m trustrl.main --config=configs/rlhf.py:demo``: a warm-started policy that writes
   random word lists is trained with DPPO-Binary-TV against that reward model.
3. A table: the reward model's score and the hidden ground truth, training (first / last 10
   iterations) and held-out greedy (before RL / after), with standard errors. Reward hacking
   shows as the first rising while the second does not.
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="workdirs/rlhf_demo")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rm_dir = os.path.join(a.workdir, "rm", "hf")
    py = sys.executable
    if not os.path.isdir(rm_dir):
        subprocess.run([py, "-m", "trustrl.tools.train_reward_model",
                        "--config=configs/reward_model.py:wordpref",
                        f"--workdir={os.path.join(a.workdir, 'rm')}", f"--out={rm_dir}"],
                       check=True, cwd=ROOT)
    rl = os.path.join(a.workdir, f"rl_s{a.seed}")
    subprocess.run([py, "-m", "trustrl.main", "--config=configs/rlhf.py:demo",
                    f"--workdir={rl}", f"--config.reward_model.hf_dir={rm_dir}",
                    f"--config.seed={a.seed}", "--config.log.progress=False"],
                   check=True, cwd=ROOT)
    from trustrl.analysis import summary
    from trustrl.infra.metrics import read_jsonl
    print(f"\nRLHF demo (seed {a.seed}): reward model {rm_dir}, run {rl}")
    summary.print_summary(read_jsonl(os.path.join(ROOT, rl, "metrics.jsonl")))


if __name__ == "__main__":
    main()
