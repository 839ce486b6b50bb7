"""Claims (recording, enforcement), the seeds table, and the committed table against the chapters' bounds."""

import json
import math

import pytest

from usae.claims import MARGIN_FRACTION, Claims, SeedsTable, parse_seeds
from usae.config import repo_root

TABLE = repo_root() / "data" / "seeds" / "book.json"


def test_claims_enforced_only_at_the_book_preset(monkeypatch, capsys):
    monkeypatch.delenv("USAE_CLAIMS_DIR", raising=False)
    monkeypatch.delenv("USAE_CLAIMS", raising=False)
    c = Claims("99_test", "book", 0)
    c.at_least("big enough", 5, 4)
    c.at_most("small enough", 3, 2)
    c.value("headline", 1.5)
    with pytest.raises(AssertionError, match="1 claim.*small enough: 3 <= 2 FAILS"):
        c.verify()
    smoke = Claims("99_test", "smoke", 0)
    smoke.at_most("small enough", 3, 2)
    smoke.verify()  # recorded and printed, not enforced
    assert "outside their book-preset bounds" in capsys.readouterr().out
    monkeypatch.setenv("USAE_CLAIMS", "record")
    c.verify()  # record mode: no raise


def test_a_deliberate_failure_is_enforced_alone_at_any_preset(monkeypatch, capsys):
    monkeypatch.delenv("USAE_CLAIMS_DIR", raising=False)
    monkeypatch.setenv("USAE_CLAIMS", "fail:99_test")
    smoke = Claims("99_test", "smoke", 0)
    smoke.at_most("small enough", 3, 2)  # outside its bound, but not enforced at smoke
    with pytest.raises(AssertionError, match=r"^1 claim\(s\) of 99_test failed.*deliberate failure"):
        smoke.verify()
    other = Claims("98_other", "smoke", 0)
    other.verify()  # another chapter is untouched


def test_claim_records_are_written_per_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("USAE_CLAIMS_DIR", str(tmp_path))
    monkeypatch.setenv("USAE_CLAIMS", "record")
    for seed, value in ((0, 5.0), (1, 7.0)):
        c = Claims("05_x", "book", seed)
        c.at_least("n", value, 4)
        c.at_least("strict", value - 4, 0, strict=True)
        c.verify()
    assert json.loads((tmp_path / "1" / "05_x.json").read_text())["claims"][0]["value"] == 7.0
    table = SeedsTable.collect(tmp_path, "book", [0, 1], threads=1)
    row = {r.name: r for r in table.rows}["n"]
    assert row.values == (5.0, 7.0) and row.worst == 5.0 and row.margin == 1.0 and row.holds and row.margin_ok()
    again = SeedsTable.load(table.save(tmp_path / "t.json"))
    assert again == table
    rec = table.records()[0]
    assert rec["min"] == 5.0 and rec["max"] == 7.0 and rec["holds"] == "yes"


def test_margin_rule():
    from usae.claims import SeedsRow

    assert SeedsRow("c", "x", ">=", 4.0, (5.0, 6.0)).margin_ok()            # margin 1 >= max(0.5, 0.5)
    assert not SeedsRow("c", "x", ">=", 4.9, (5.0, 6.0)).margin_ok()        # 0.1 < 0.5
    assert not SeedsRow("c", "x", ">=", 1.0, (2.0, 7.0)).margin_ok()        # 1 < half the spread, 2.5
    assert SeedsRow("c", "none", "<=", 0.0, (0.0, 0.0)).margin_ok()         # exact "none"
    assert not SeedsRow("c", "count", "<=", 1.0, (1.0, 0.0)).margin_ok()    # not exact: a count at its bound
    assert not SeedsRow("c", "x", ">", 0.0, (0.0, 1.0)).holds
    assert not SeedsRow("c", "x", ">=", 1.0, (0.5, math.nan)).holds         # a missing seed fails
    assert SeedsRow("c", "x", "<=", 0.8, (0.5, 0.6)).margin == pytest.approx(0.2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="seeds = 'x' is not valid"):
        parse_seeds("x")
    with pytest.raises(ValueError, match="distinct"):
        parse_seeds("1,1")
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    c = Claims("01", "book", 0)
    c.value("a", 1)
    with pytest.raises(ValueError, match="recorded twice"):
        c.value("a", 2)
    with pytest.raises(ValueError, match="not a number"):
        c.value("b", "many")


def _chapter_claim_sources() -> dict[str, str]:
    """The Checks cell (the one that calls ``claims.verify()``) of every numbered chapter."""
    out = {}
    for nb in sorted((repo_root() / "book").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        checks = [src for src in code if "claims.verify()" in src]
        assert len(checks) == 1, f"{nb.stem}: expected one Checks cell calling claims.verify(), found {len(checks)}"
        out[nb.stem] = checks[0]
    return out


def test_every_chapter_states_its_claims():
    for chapter, source in _chapter_claim_sources().items():
        assert f'Claims("{chapter}", preset, seed)' in source, chapter
        assert "preset" not in source.replace('Claims("' + chapter + '", preset, seed)', ""), \
            f"{chapter}: the Checks cell must not branch on the preset (claims know where they are enforced)"


def test_committed_seeds_table_holds_with_margin_for_every_claim():
    table = SeedsTable.load(TABLE)
    assert table.preset == "book" and len(table.seeds) >= 5 and table.cpu
    bounded = [r for r in table.rows if r.op is not None]
    assert bounded
    bad = [(r.chapter, r.name, r.values, r.op, r.bound) for r in bounded if not (r.holds and r.margin_ok())]
    assert not bad, f"claims without a {MARGIN_FRACTION:.0%} margin over the worst seed: {bad}"


def test_committed_table_covers_every_seeded_chapter():
    from usae.book import chapters

    table = SeedsTable.load(TABLE)
    expected = {p.stem for p in chapters(repo_root())}
    assert {r.chapter for r in table.rows} == expected
    assert all(len(r.recorded) == len(table.seeds) for r in table.rows), "every seed recorded every claim"


def test_seeds_command_writes_the_table(tmp_path, monkeypatch):
    """The seeds command at the smoke preset on one short chapter: records, table, and the environment restored."""
    import os

    from usae.book import seeds

    monkeypatch.setenv("USAE_RUNS", str(tmp_path / "runs"))
    before = {k: os.environ.get(k) for k in ("USAE_SEED", "USAE_CLAIMS", "USAE_CLAIMS_DIR")}
    path = seeds([0, 1], "smoke", names=["01_toy_world"], table=tmp_path / "t.json", work=tmp_path / "work")
    table = SeedsTable.load(path)
    assert table.seeds == (0, 1) and {r.chapter for r in table.rows} == {"01_toy_world"}
    assert all(len(r.recorded) == 2 for r in table.rows)
    assert any(r.values[0] != r.values[1] for r in table.rows), "another seed trains another zoo"
    assert (tmp_path / "work" / "executed" / "01_toy_world-seed1.ipynb").exists()
    assert {k: os.environ.get(k) for k in before} == before
