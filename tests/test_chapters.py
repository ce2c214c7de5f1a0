"""The chapter standard over every chapter of the book, and each check against a planted violation."""

from pathlib import Path

import pytest

from agm.chapter_checks import chapters, page_functions, self_reference, structure, typed_numbers

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = chapters(BOOK)
# Functions a chapter may define: plotting helpers specific to one figure.
PLOTTING_HELPERS = frozenset({"draw", "show", "panel", "plot_row"})

GOOD = """---
jupytext: {}
---

(ch-example)=
# An example

The model reaches {glue:text}`nll:.1f` nats on the 10 000 test images {cite}`kingma2014auto`; see
[Chapter 17](ch-elbo), eq. {eq}`eq-elbo` and $x_{t-1} = 3.5 x_t$ with a 3×3 kernel.

```{code-cell} ipython3
def short(x):
    return x + 1
```

:::{exercise}
:label: ex-a
Try 20 steps.
:::

:::{solution} ex-a
About 0.5.
:::
"""


def test_there_are_chapters_to_check():
    assert len(CHAPTERS) >= 24


def test_a_clean_chapter_passes_every_check():
    assert typed_numbers(GOOD) == [] and structure(GOOD) == [] and page_functions(GOOD) == []
    assert self_reference(GOOD) == []


def test_a_typed_number_is_caught_with_its_line():
    planted = GOOD.replace("Try 20 steps.\n:::", "Try 20 steps.\n:::\n\nThe sampler ran 16 chains at 0.25 s each.")
    found = typed_numbers(planted)
    assert len(found) == 1 and "16, 0.25" in found[0][1]
    assert planted.split("\n")[found[0][0] - 1].startswith("The sampler ran")


def test_missing_structure_is_caught():
    assert any("label" in m for _, m in structure(GOOD.replace("(ch-example)=\n", "")))
    assert any("cites no source" in m for _, m in structure(GOOD.replace("{cite}`kingma2014auto`", "")))
    assert any("solutions" in m for _, m in structure(GOOD.replace(":::{solution} ex-a\nAbout 0.5.\n:::\n", "")))


def test_an_algorithm_on_the_page_is_caught():
    body = "".join(f"    y{i} = x + {i}\n" for i in range(8))
    planted = GOOD.replace("def short(x):\n    return x + 1\n", f"def fit(x):\n{body}    return y0\n")
    assert [n for n, _ in page_functions(planted)] == [planted.split("\n").index("def fit(x):") + 1]
    assert page_functions(planted, allowed=frozenset({"fit"})) == []


def test_talk_of_goals_is_caught():
    assert self_reference(GOOD.replace("An example\n", "An example\n\nThis falls short of our target.\n"))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_chapter_meets_the_structure(path):
    text = path.read_text(encoding="utf-8")
    problems = structure(text) + self_reference(text)
    assert not problems, "\n".join(f"{path}:{n}: {m}" for n, m in problems)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_chapter_defines_an_algorithm(path):
    problems = page_functions(path.read_text(encoding="utf-8"), PLOTTING_HELPERS)
    assert not problems, "\n".join(f"{path}:{n}: {m}" for n, m in problems)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_chapter_types_a_number(path):
    problems = typed_numbers(path.read_text(encoding="utf-8"))
    assert not problems, "\n".join(f"{path}:{n}: {m}" for n, m in problems)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_included_object_exists(path):
    """A ``literalinclude`` with ``:pyobject:`` names a function, class or method its file defines (Sphinx
    only warns, late in the build, when code moves)."""
    import ast
    import re

    text = path.read_text()
    missing = []
    for match in re.finditer(r"```\{literalinclude\} (\S+)\n((?::[^\n]*\n)*)", text):
        obj = re.search(r"^:pyobject: (\S+)$", match.group(2), re.M)
        if obj is None:
            continue
        tree = ast.parse((path.parent / match.group(1)).read_text())
        names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        names |= {f"{c.name}.{f.name}" for c in tree.body if isinstance(c, ast.ClassDef)
                  for f in c.body if isinstance(f, ast.FunctionDef)}
        if obj.group(1) not in names:
            missing.append(f"{match.group(1)}: {obj.group(1)}")
    assert not missing, f"{path.name} includes objects its files do not define: {missing}"
