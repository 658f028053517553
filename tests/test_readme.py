"""Claims the README makes that the code can check."""

from __future__ import annotations

from pathlib import Path

from events.catalog import markdown

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_event_catalogue_matches_the_schemas() -> None:
    begin, end = "<!-- event-catalog:begin -->\n", "<!-- event-catalog:end -->"
    text = README[README.index(begin) + len(begin) : README.index(end)]
    assert text == markdown(), "run `python -m events.catalog` and paste it into the README"
