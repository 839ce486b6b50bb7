"""The ``usae`` command line: one console script with every subcommand, and every command the pages show."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from usae import cli

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("extract", "train", "bench", "book", "seeds")
PAGES = ["README.md", "book/intro.md", "book/appendix_paper_scale.md", "book/appendix_discrepancies.md",
         "book/appendix_reproducibility.ipynb", "book/10_performance.ipynb"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "usae"
    assert script.is_file(), f"{script} is missing: reinstall with pip install -e ."
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and all(name in done.stdout for name in SUBCOMMANDS)
    same = subprocess.run([sys.executable, "-m", "usae.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert same.stdout == done.stdout


def commands_shown() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        for cmd in re.findall(r"(?<![\w.-])(usae (?:extract|train|bench|book|seeds)\b[^`\n\"\\|]*)", text):
            found.append((page, cmd.split("  #")[0].strip()))
    return found


def test_the_pages_show_the_commands():
    pages = {page for page, _ in commands_shown()}
    assert {"README.md", "book/appendix_paper_scale.md", "book/appendix_reproducibility.ipynb"} <= pages
    retired = re.compile(r"python -m usae\.(book|bench|perf\.step|perf\.cam)\b")
    old = [page for page in PAGES if retired.search((ROOT / page).read_text())]
    assert old == [], f"pages still show the old commands: {old}"


@pytest.mark.parametrize("page,command", commands_shown())
def test_every_command_the_pages_show_parses(page, command):
    args = cli._parser().parse_args(shlex.split(command)[1:])
    assert args.command in SUBCOMMANDS


def test_bad_input_exits_1_and_names_the_value(capsys):
    assert cli.main(["bench", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert "nosuch" in err and "step" in err
    assert cli.main(["extract", "--seed", "x"]) == 1
    assert "--seed x" in capsys.readouterr().err
    assert cli.main(["seeds", "--seeds", "3-1"]) == 1
