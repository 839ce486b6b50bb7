"""The ``usae`` command line: one console script with every subcommand, and every command the pages show."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from usae import cli

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("extract", "train", "r2", "concepts", "gallery", "bench", "book", "seeds")
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


def page_text(page: str) -> str:
    text = (ROOT / page).read_text()
    if page.endswith(".ipynb"):
        import json

        text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"])
    return text


def commands_shown() -> list[tuple[str, str]]:
    """Every ``usae <subcommand> ...`` a page shows: in inline code spans and on code-block lines."""
    found = []
    sub = r"usae (?:extract|train|r2|concepts|gallery|bench|book|seeds)\b"
    for page in PAGES:
        text = page_text(page)
        spans = re.findall(rf"`({sub}[^`]*)`", text)
        lines = [line.strip() for line in text.splitlines() if re.match(rf"\s*(?:make \w+\s+#\s*)?{sub}", line)]
        lines = [re.sub(r"^make \w+\s+#\s*", "", line) for line in lines]
        for cmd in spans + lines:
            found.append((page, cmd.split("  #")[0].strip()))
    return found


def test_the_pages_show_the_commands():
    pages = {page for page, _ in commands_shown()}
    assert {"README.md", "book/appendix_paper_scale.md", "book/appendix_reproducibility.ipynb"} <= pages
    retired = re.compile(r"python -m usae\.(book|bench|perf\.step|perf\.cam)\b")
    old = [page for page in PAGES if retired.search(page_text(page))]
    assert old == [], f"pages still show the old commands: {old}"


@pytest.mark.parametrize("page,command", commands_shown())
def test_every_command_the_pages_show_parses(page, command):
    args = cli._parser().parse_args(shlex.split(command.replace("RUN", "run"))[1:])
    assert args.command in SUBCOMMANDS


def test_bad_input_exits_1_and_names_the_value(capsys):
    assert cli.main(["bench", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert "nosuch" in err and "step" in err
    assert cli.main(["extract", "--seed", "x"]) == 1
    assert "--seed x" in capsys.readouterr().err
    assert cli.main(["seeds", "--seeds", "3-1"]) == 1


def test_missing_pretrained_weights_are_one_clear_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.ppm").write_bytes(b"P6 8 8 255\n" + bytes(8 * 8 * 3))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    argv = ["extract", "--preset", "paper", "--images", str(images), "--runs", str(tmp_path / "runs"),
            "--set", "extract.n_train_images=3", "--set", "extract.n_val_images=2", "--set", "extract.n_stats_images=2"]
    done = subprocess.run([sys.executable, "-m", "usae.cli", *argv], capture_output=True, text=True, timeout=300,
                          env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: could not load pretrained weights") and '"pretrained\\": false' not in lines[0]
    assert '"pretrained": false' in lines[0] and "HF_HOME" in lines[0]


def test_help_shows_plain_text_and_the_pages_cite_the_paper_not_a_missing_spec(capsys):
    for argv in ([], *[[name] for name in SUBCOMMANDS]):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        assert "``" not in capsys.readouterr().out
    files = [*PAGES, *[str(p.relative_to(ROOT)) for p in (ROOT / "usae").rglob("*.py")]]
    assert [f for f in files if "PAPER.md" in (ROOT / f).read_text()] == []


def test_a_runs_folder_that_cannot_be_used_is_named_with_its_fix(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert cli.main(["extract", "--preset", "smoke", "--runs", str(afile)]) == 1
    assert "--runs" in (err := capsys.readouterr().err) and "is a file" in err and "Errno" not in err
    assert cli.main(["extract", "--preset", "smoke", "--runs", str(afile / "below")]) == 1
    assert "cannot be written" in (err := capsys.readouterr().err) and "USAE_RUNS=DIR" in err
