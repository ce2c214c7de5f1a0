"""Sphinx extension of the book: MathJax served from the build, and chapter numbers from file names.

* MathJax 3 comes from the ``django-static-mathjax`` wheel (the files only) and is copied into
  ``_static/mathjax``, so pages typeset their equations with no network.
* Each executed chapter is offered as a Jupyter notebook in the page's download menu.
* A chapter file ``book/<module>/NN-slug.md`` is Chapter NN whichever chapters exist before it:
  Sphinx numbers by position in the table of contents, so its section, figure, equation and
  theorem numbers are rewritten to start with NN.
* Every chapter ends with a "Cite this chapter" BibTeX entry made from its number and title.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

MATHJAX_ENTRY = "mathjax/tex-mml-chtml.js"
CHAPTER = re.compile(r"(?:^|/)(\d\d)-[^/]+$")


def mathjax_source() -> Path:
    import mathjax  # the django-static-mathjax wheel

    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def _use_local_mathjax(app, config) -> None:
    config.mathjax_path = MATHJAX_ENTRY


def _copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    dest = Path(app.outdir) / "_static" / "mathjax"
    if not (dest / "tex-mml-chtml.js").is_file():
        shutil.copytree(mathjax_source(), dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*svg*", "node-main.js"))


def _executed_notebook(app, pagename: str) -> Path:
    # myst-nb writes each executed notebook beside the HTML folder, in jupyter_execute/.
    return Path(app.outdir).parent / "jupyter_execute" / f"{pagename}.ipynb"


def _offer_notebook(app, pagename, templatename, context, doctree) -> None:
    notebook = _executed_notebook(app, pagename)
    if app.builder.format == "html" and notebook.is_file():
        dest = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(notebook, dest)
        context["ipynb_source"] = f"{pagename}.ipynb"  # read by the theme's download menu


BOOK_TITLE = "Advanced Generative Modeling"
AUTHORS = "{The Advanced Generative Modeling authors}"
TITLE_LINE = re.compile(r"^# (.+?)\s*$", re.M)


def citation_year() -> str:
    """The year of the book's preferred citation in CITATION.cff (the landing page cites the same)."""
    text = (Path(__file__).resolve().parents[2] / "CITATION.cff").read_text(encoding="utf-8")
    return re.findall(r"^\s*year:\s*(\d{4})\s*$", text, re.M)[-1]


def chapter_citation(number: int, title: str, year: str) -> str:
    """The BibTeX entry of Chapter ``number``: an @incollection in the book."""
    return (f"@incollection{{agm{year}ch{number},\n  title     = {{{title}}},\n  booktitle = {{{BOOK_TITLE}}},\n"
            f"  chapter   = {{{number}}},\n  author    = {{{AUTHORS}}},\n  year      = {{{year}}}\n}}")


def _append_citation(app, docname: str, source: list[str]) -> None:
    """source-read: a chapter's markdown gains a closing "Cite this chapter" rubric and its entry."""
    n = chapter_number(docname)
    title = TITLE_LINE.search(source[0]) if n is not None else None
    if title is None:
        return
    entry = chapter_citation(n, title.group(1), citation_year())
    source[0] = source[0].rstrip() + f"\n\n```{{rubric}} Cite this chapter\n```\n\n```bibtex\n{entry}\n```\n"


def chapter_number(docname: str) -> int | None:
    m = CHAPTER.search(docname)
    return int(m.group(1)) if m else None


def _renumber(app, env) -> list[str]:
    """Replace the positional chapter number by the one in the file name, everywhere Sphinx keeps it:
    section numbers, figure/equation/theorem numbers, the toctree entries (sidebar) and the title
    (previous/next links)."""
    from docutils import nodes

    def fix(number, n):
        return type(number)([n, *number[1:]]) if number else number

    for docname, secnums in env.toc_secnumbers.items():
        n = chapter_number(docname)
        if n is None:
            continue
        for anchor, number in secnums.items():
            secnums[anchor] = fix(number, n)
        for figs in env.toc_fignumbers.get(docname, {}).values():
            for fig_id, number in figs.items():
                if len(number) > 1:
                    figs[fig_id] = fix(number, n)
        for ref in env.tocs[docname].findall(nodes.reference):
            ref["secnumber"] = fix(ref.get("secnumber"), n)
        title = env.titles.get(docname)
        if title is not None:
            title["secnumber"] = fix(title.get("secnumber"), n)
    return []


def setup(app):
    app.connect("config-inited", _use_local_mathjax, priority=900)
    app.connect("source-read", _append_citation)
    app.connect("env-get-updated", _renumber, priority=900)  # after Sphinx's own numbering (500)
    app.connect("html-page-context", _offer_notebook, priority=400)  # before the theme's buttons (501)
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
