"""The README's quickstart, run as written (Python and command line) on two timm models that are not in the
registry, each at a chosen layer: random weights, a few generated images, tiny sizes. Every replacement below
must find its text in the README, so the README cannot drift away from what is tested."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usae.data import zoo

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SMALL = {"n_train_images=2000": "n_train_images=12", "n_val_images=500": "n_val_images=6",
         "n_stats_images=500": "n_stats_images=6", "grid=14": "grid=4", "image_size=224": "image_size=32",
         "expansion=4, k=16": "expansion=1, k=4", "steps=3000, batch_size=1024": "steps=6, batch_size=64",
         'device="auto"': 'device="cpu"'}


def block(language: str) -> str:
    section = README[README.index("## Quickstart"):]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def replaced(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"the README's quickstart no longer contains {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("my_images")
    rng = np.random.default_rng(0)
    for i in range(18):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_the_python_quickstart_is_short_and_runs(images, tmp_path, monkeypatch, capsys):
    code = block("python")
    assert len(code.strip().splitlines()) <= 15
    ids = re.findall(r'BackboneSpec\("([^"]+)", layer=(-?\d+)\)', code)
    assert len(ids) == 2 and all(i not in zoo.REGISTRY for i, _ in ids)  # timm ids, not shortcuts
    real = zoo.create_model
    monkeypatch.setattr(zoo, "create_model", lambda name, pretrained: real(name, False))  # offline: random weights
    monkeypatch.setenv("USAE_RUNS", str(tmp_path / "runs"))
    exec(compile(replaced(code, {**SMALL, '"/path/to/my_images"': repr(str(images))}), "README", "exec"), {})
    out = capsys.readouterr().out
    assert "tensor([[" in out and "ConceptRow(concept=" in out


def test_the_command_line_quickstart_runs(images, tmp_path):
    lines = [line for line in block("sh").splitlines() if line.startswith("usae ")]
    assert [line.split()[1] for line in lines] == ["train", "r2", "concepts", "gallery"]
    train = replaced(lines[0], {"/path/to/my_images": str(images), "--set extract.n_train_images=2000":
                                "--set extract.n_train_images=12", "--set train.steps=3000": "--set train.steps=6",
                                '"layer": -2}': '"layer": -2, "pretrained": false}',
                                '"layer": 3}': '"layer": 3, "pretrained": false}'})
    tiny = ["extract.n_val_images=6", "extract.n_stats_images=6", "extract.grid=4", "extract.image_size=32",
            "usae.expansion=1", "usae.k=4", "train.batch_size=64", "train.warmup_steps=2", "device=cpu"]
    args = [*shlex.split(train)[1:], *[x for s in tiny for x in ("--set", s)], "--runs",
            str(tmp_path / "runs"), "--quiet"]

    def usae(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", "usae.cli", *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run = usae(*args).strip().splitlines()[-1]
    assert Path(run, "model.safetensors").is_file() and Path(run, "config.json").is_file()
    r2 = usae("r2", run, "--quiet")
    assert "encoder" in r2 and len(r2.strip().splitlines()) == 3
    concepts = usae(*lines[2].replace("RUN", run).split()[1:], "--quiet")
    assert concepts.splitlines()[0].startswith("concept") and len(concepts.strip().splitlines()) == 21
    page = tmp_path / "concept42.html"
    assert usae("gallery", run, "42", "--out", str(page), "--quiet").strip() == str(page)
    assert "Plotly.newPlot" in page.read_text()


def test_the_book_intro_shows_the_same_quickstart():
    intro = (ROOT / "book" / "intro.md").read_text()
    assert f"```python\n{block('python')}```" in intro and f"```sh\n{block('sh')}```" in intro
