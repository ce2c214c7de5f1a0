"""The book build: stale outputs are discarded when code changes, never when prose does."""

import re
import textwrap
from pathlib import Path

import pytest

from agm import book
from agm.sphinx_ext import chapter_number, mathjax_source


def write_tiny_book(root: Path, value: int, prose: str, pages: int = 1) -> None:
    (root / "pkg").mkdir(parents=True, exist_ok=True)
    (root / "pkg" / "tinymod.py").write_text(f"VALUE = {value}\n")
    (root / "_config.yml").write_text(textwrap.dedent("""\
        title: tiny
        only_build_toc_files: true
        execute:
          execute_notebooks: cache
        html:
          use_repository_button: false
        sphinx:
          extra_extensions: [agm.sphinx_ext]
          config:
            nb_ipywidgets_js: {}
        """))
    (root / "_toc.yml").write_text(textwrap.dedent("""\
        format: jb-book
        root: index
        parts:
          - caption: A part
            numbered: true
            chapters:
        """) + "".join(f"      - file: {7 + i:02d}-page\n" for i in range(pages)))
    (root / "index.md").write_text("# Tiny book\n")
    for i in range(pages):
        (root / f"{7 + i:02d}-page.md").write_text(tiny_page(prose, 7 + i))


def tiny_page(prose: str, number: int) -> str:
    return textwrap.dedent(f"""\
        ---
        jupytext:
          text_representation:
            format_name: myst
        kernelspec:
          name: python3
          display_name: Python 3
        ---
        # Tiny

        {prose}

        ```{{code-cell}} ipython3
        import sys, uuid  # page {number}
        sys.path.insert(0, "pkg")
        import tinymod
        print("value", tinymod.VALUE, "run", uuid.uuid4().hex)
        ```
        """)


def built_output(root: Path, page: str = "07-page") -> tuple[str, str]:
    html = (root / "_build" / "html" / f"{page}.html").read_text()
    m = re.search(r"value (\d+) run ([0-9a-f]{32})", html)
    assert m, "the cell's output is missing from the page"
    return m.group(1), m.group(2)


@pytest.mark.slow
def test_code_change_reexecutes_and_prose_change_does_not(tmp_path, monkeypatch):
    monkeypatch.delenv("AGM_BOOK_OUT", raising=False)
    globs = ("pkg/**/*.py",)
    write_tiny_book(tmp_path, value=1, prose="First words.")
    book.build(tmp_path, globs=globs, log=lambda *_: None)
    value, run = built_output(tmp_path)
    assert value == "1"
    html = tmp_path / "_build" / "html"
    assert (html / "_sources" / "07-page.ipynb").is_file(), "the executed notebook is offered for download"
    page = (html / "07-page.html").read_text()
    assert "_sources/07-page.ipynb" in page
    # the only chapter is numbered 7, from its file name, in its title and in the sidebar
    assert re.search(r"<h1>\s*<span class=\"section-number\">7\. </span>Tiny", page)
    assert re.search(r"7\. Tiny", (html / "index.html").read_text())

    write_tiny_book(tmp_path, value=1, prose="Other words, same code.")
    book.build(tmp_path, globs=globs, log=lambda *_: None)
    assert "Other words" in (tmp_path / "_build" / "html" / "07-page.html").read_text()
    assert built_output(tmp_path) == ("1", run), "a prose-only edit re-executed the page"

    write_tiny_book(tmp_path, value=2, prose="Other words, same code.")
    book.build(tmp_path, globs=globs, log=lambda *_: None)
    value, run2 = built_output(tmp_path)
    assert value == "2" and run2 != run, "a code change left a stale output"


@pytest.mark.slow
def test_chapters_executed_ahead_in_parallel_are_the_ones_sphinx_shows(tmp_path, monkeypatch):
    from jupyter_cache import get_cache

    monkeypatch.delenv("AGM_BOOK_OUT", raising=False)
    write_tiny_book(tmp_path, value=3, prose="Words.", pages=3)
    assert [p.name for p in book.toc_files(tmp_path)] == ["index.md", "07-page.md", "08-page.md", "09-page.md"]
    logs = []
    book.build(tmp_path, globs=("pkg/**/*.py",), log=logs.append, jobs=2)
    assert "book: 3 chapters executed" in " ".join(logs)
    cache = get_cache(str(tmp_path / "_build" / ".jupyter_cache"))
    cached = {cache.get_cache_bundle(r.pk).nb.cells[0].outputs[0]["text"].split()[-1]
              for r in cache.list_cache_records()}
    shown = {built_output(tmp_path, page)[1] for page in ("07-page", "08-page", "09-page")}
    assert len(shown) == 3 and shown == cached, "Sphinx executed a chapter again instead of using the cache"


def test_fingerprint_tracks_code_and_checkpoints_not_prose(tmp_path):
    (tmp_path / "code" / "agm").mkdir(parents=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "book").mkdir()
    (tmp_path / "code" / "agm" / "m.py").write_text("x = 1\n")
    (tmp_path / "checkpoints" / "a.json").write_text("{}")
    (tmp_path / "book" / "ch.md").write_text("prose")
    base = book.fingerprint(tmp_path)
    (tmp_path / "book" / "ch.md").write_text("more prose")
    assert book.fingerprint(tmp_path) == base
    (tmp_path / "code" / "agm" / "m.py").write_text("x = 2\n")
    changed = book.fingerprint(tmp_path)
    assert changed != base
    (tmp_path / "checkpoints" / "a.json").write_text('{"sha256": "new"}')
    assert book.fingerprint(tmp_path) != changed


def test_discard_stale_removes_outputs_only_when_fingerprint_differs(tmp_path):
    for d in ("html", ".jupyter_cache", ".doctrees", "smoke"):
        (tmp_path / d).mkdir()
    (tmp_path / book.FINGERPRINT_FILE).write_text("abc\n")
    assert not book.discard_stale(tmp_path, "abc", log=lambda *_: None)
    assert (tmp_path / ".jupyter_cache").exists()
    assert book.discard_stale(tmp_path, "def", log=lambda *_: None)
    assert not (tmp_path / ".jupyter_cache").exists() and not (tmp_path / "html").exists()
    assert (tmp_path / "smoke").exists(), "the smoke build lives beside the full one and is not touched"


def test_smoke_and_full_builds_never_share_a_folder(monkeypatch):
    monkeypatch.delenv("AGM_BOOK_OUT", raising=False)
    root = Path("/repo")
    assert book.build_dir(root, smoke=True) != book.build_dir(root, smoke=False)
    assert book.build_dir(root, smoke=False) == root / "_build"
    assert book.build_dir(root, smoke=True).is_relative_to(root / "_build" / "smoke")


def test_external_assets_are_detected(tmp_path):
    (tmp_path / "a.html").write_text('<script src="https://cdn.example.org/x.js"></script>'
                                     '<link rel="stylesheet" href="//fonts.example.org/f.css">')
    (tmp_path / "b.html").write_text('<script src="_static/mathjax/tex-mml-chtml.js"></script>'
                                     '<a href="https://arxiv.org/abs/1234">a paper</a>')
    found = book.external_assets(tmp_path)
    assert len(found) == 2 and all(f.startswith("a.html") for f in found)


def test_chapter_numbers_come_from_file_names():
    assert chapter_number("book/foundations/01-basics") == 1
    assert chapter_number("book/diffusion/37-ddim") == 37
    assert chapter_number("book/index") is None


def test_mathjax_is_shipped_locally():
    assert (mathjax_source() / "tex-mml-chtml.js").is_file()
    assert any((mathjax_source() / "output" / "chtml" / "fonts").rglob("*.woff"))


def test_every_chapter_gets_its_bibtex_entry_and_other_pages_none():
    from agm.sphinx_ext import _append_citation, citation_year

    source = ["---\njupytext: {}\n---\n\n(ch-x)=\n# Jensen's inequality\n\nText.\n"]
    _append_citation(None, "book/foundations/05-jensen", source)
    year = citation_year()
    assert source[0].rstrip().endswith("```") and "```{rubric} Cite this chapter" in source[0]
    assert f"@incollection{{agm{year}ch5," in source[0] and "title     = {Jensen's inequality}" in source[0]
    assert "chapter   = {5}" in source[0]
    other = ["# Results of all models\n"]
    _append_citation(None, "book/appendix/results", other)
    assert other == ["# Results of all models\n"]
