"""The command line (trustrl.main): bad flags and config files exit 2 with one line."""
import os
import subprocess
import sys

import pytest

from trustrl import main as cli


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


TINY = "--config=configs/default.py:tiny"


def _main(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "trustrl.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- command-line parsing: exits before jax is imported (about a second each) ---------------

@pytest.mark.parametrize("args,needles", [
    ([TINY, "--config.loss.methd=ppo_clip"],
     ["unknown field config.loss.methd", "did you mean config.loss.method?", "agg, alpha"]),
    ([TINY, "--config.optim.learning_rate=abc"],
     ["config.optim.learning_rate must be a float, got 'abc'"]),
    ([TINY, "--config.train.iterations=2.5"],
     ["config.train.iterations must be an int, got '2.5'"]),
    (["--config=configs/default.py:nope"], ["unknown variant 'nope'", "'default', 'tiny'"]),
    (["--config=configs/nope.py"], ["config file 'configs/nope.py' not found"]),
    ([TINY, "--workdirr=x"], ["usage:", "Unknown command line flag 'workdirr'"]),
    ([TINY, "stray"], ["usage:", "unexpected arguments ['stray']"]),
])
def test_bad_command_line_exits_2_without_creating_the_workdir(tmp_path, subprocess_env, args,
                                                                needles):
    wd = tmp_path / "run"
    out = _main([*args, f"--workdir={wd}"], subprocess_env, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("invalid config: ", "usage: ")), lines
    for needle in needles:
        assert needle in lines[0]
    assert not wd.exists()


def test_missing_workdir_is_a_usage_error(subprocess_env):
    out = _main([TINY], subprocess_env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"{cli.USAGE}: --workdir is required"


def test_describe_parse_error_in_process():
    argv = ["main", TINY, "--config.mesh.dta=2"]
    msg = cli.describe_parse_error(argv, AttributeError("dta"))
    assert msg == ("invalid config: unknown field config.mesh.dta (did you mean config.mesh.data?)"
                   "; fields of config.mesh: data, fsdp, tensor")
    msg = cli.describe_parse_error(["main", TINY, "--config.seed.x=1"], AttributeError("x"))
    assert "(config.seed is a value of type int, not a group)" in msg
    msg = cli.describe_parse_error(["main", TINY, "--config.log.progress=maybe"], ValueError())
    assert msg == "invalid config: config.log.progress must be a bool, got 'maybe'"
    assert cli.describe_parse_error(["main", "--workdir=w"], ValueError()).endswith(
        "--config is required")


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path, subprocess_env):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "trustrl.main", f"--config={bad}",
                          f"--workdir={tmp_path / 'wd'}"], cwd=REPO, env=subprocess_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith(f"invalid config: --config={bad}: SyntaxError: ")
    assert not (tmp_path / "wd").exists()


def test_an_os_error_line_names_its_file():
    assert cli._error_line(OSError(30, "Read-only file system", "/wd/checkpoints/3")) == \
        "Read-only file system: /wd/checkpoints/3"
    assert cli._error_line(OSError(30, "Read-only file system")) == "Read-only file system"
