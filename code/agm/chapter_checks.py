"""The chapter standard, checked: what every chapter of the book must have, and what its prose must not.

Each check takes a chapter's markdown and returns its violations as ``(line, message)`` pairs, so a
test can name the file and line. The checks:

* :func:`typed_numbers` — a digit in running text, outside math, code, roles (glue, cite, ref, eq),
  chapter/section/equation references, years, and a short list of definitional constants. A number
  the code decides is glued; one the reader should check is computed.
* :func:`structure` — a labelled title, at least one citation, exercises each with a solution.
* :func:`page_functions` — a code cell that defines a function or class longer than a few lines
  (an algorithm belongs in ``code/agm``, tested, and is imported).
* :func:`self_reference` — prose about goals, targets or the development of the book.
"""

from __future__ import annotations

import re
from pathlib import Path

Violation = tuple[int, str]

# Constants that define the setting rather than report a result, and the forms a reference takes.
ALLOWED = [
    r"\bChapters? \d+(?:\s*(?:–|-|,|and|or|to)\s*\d+)*",
    r"\b(?:Sections?|Modules?|Parts?|Tables?|Figures?|Algorithms?|Steps?|Exercises?|Theorems?|parts?) \d+(?:\.\d+)*"
    r"(?:\s*(?:–|-|,|and|or)\s*\d+)*",
    r"\b(?:19|20)\d\d[a-z]?\b",  # years, in citations
    r"\b\d+\s*[×x]\s*\d+(?:\s*[×x]\s*\d+)?\b",  # image, grid and kernel sizes: 28×28, 3×3, 4×7×7
    r"\b\d+\s*(?:→|->)\s*\d+(?:\s*(?:→|->)\s*\d+)*",  # resolutions along a path: 28 → 14 → 7
    r"\b(?:784|60 000|50 000|10 000|49|256)\b",  # MNIST's pixels, splits and gray levels; a 7×7 grid's 49 positions
    r"\b\d-D\b", r"\b[A-Za-z]+[-_]?\d+[A-Za-z]*\b",  # 2-D; names such as VQ-VAE-2, L2, ch14, float64
    r"\b(?:zero|one|0|1)(?:-| )(?:indexed|based)\b",
    r"\(\d+\)",  # the parts (1), (2) of a proof
    r"(?<![\d.,])[0-9](?![.,]?\d)",  # a single digit (not part of a decimal): a count read at a glance
]
ALLOWED_RE = re.compile("|".join(f"(?:{a})" for a in ALLOWED))
LIST_ITEM = re.compile(r"^\s*(?:\d+\.|[-*+])\s+")
SELF_REFERENCE = re.compile(
    r"\b(?:our|the book's|this book's|the page's) (?:goal|target|aim|objective)s?\b|\bgoal number\b|"
    r"\b(?:not yet|still to be) (?:written|implemented|measured)\b|\bTODO\b|\bFIXME\b|\bin a later session\b|"
    r"\bsession\b|\bissue (?:#?\d+|tracker)\b|\bwe (?:plan|intend) to\b",
    re.I,
)
MAX_FUNCTION_LINES = 6  # a def or class in a code cell longer than this is an algorithm on the page


def _strip_inline(text: str) -> str:
    text = re.sub(r"\{cite(?::\w+)?\}`[^`]*`", " CITED ", text)  # a citation, remembered as such
    text = re.sub(r"\{[\w:-]+\}`[^`]*`", " ", text)  # other roles: {glue:text}`x`, {eq}`x`, {ref}`x`
    text = re.sub(r"`[^`]*`", " ", text)  # inline code
    text = re.sub(r"\[[\d.]+\]\([^)]*\)", " ", text)  # a numbered link: Chapters [20](ch-x) and [21](ch-y)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    text = re.sub(r"<[^>]+>", " ", text)  # html tags
    return text


def prose_lines(markdown: str, skip: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    """The running text of a chapter, line by line, with math, code and directive options removed.

    ``skip`` names colon-fence directives (e.g. "exercise") whose text is left out.
    """
    lines = markdown.split("\n")
    start = 0
    if lines and lines[0].strip() == "---":  # front matter
        start = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), len(lines) - 1) + 1
    out, fence, math, skipping = [], None, False, None
    for n in range(start, len(lines)):
        raw = lines[n]
        s = raw.strip()
        if fence is not None:
            if s.startswith(fence) and not s[len(fence):].strip():
                fence = None
            continue
        m = re.match(r"^(`{3,}|~{3,})(.*)$", s)
        if m:
            # code, math and includes are skipped whole; prose directives (proofs, exercises) are read
            info = m.group(2)
            prose = re.match(r"\{(prf:\w+|admonition|note|tip|warning|important|solution|exercise|dropdown)\}", info)
            if not prose:
                fence = m.group(1)
            continue
        if skipping:
            if s == skipping:
                skipping = None
            continue
        opening = re.match(r"^(:{3,})\{(\w+)\}", s)
        if opening and opening.group(2) in skip:
            skipping = opening.group(1)
            continue
        if s.startswith(":") and not s.startswith(":::"):
            continue  # a directive's option
        if s.startswith(":::") or re.match(r"^\(.*\)=$", s) or s.startswith("|") or s.startswith("<!--"):
            continue  # a colon fence, a label, a table row (built by code), a comment
        text = LIST_ITEM.sub("", raw)
        # display math may span lines: $$ ... $$, and inline $...$ may break across a line end
        pieces, kept = re.split(r"(\$\$|\$)", text), []
        for piece in pieces:
            if piece in ("$", "$$"):
                math = not math
            elif not math:
                kept.append(piece)
        out.append((n + 1, _strip_inline(" ".join(kept))))
    return out


QUOTES_A_SOURCE = re.compile(r"\bet al\b|\bCITED\b|\b[Tt]he paper\b|\b[Tt]heir\b")


def sentences(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Consecutive prose lines joined into paragraphs and split into sentences: (first line, sentence)."""
    out, paragraph = [], []

    def flush():
        if paragraph:
            text = " ".join(t for _, t in paragraph)
            starts = [n for n, _ in paragraph]
            offsets, pos = [], 0
            for _, t in paragraph:
                offsets.append(pos)
                pos += len(t) + 1
            # a sentence ends at . ! ? before a space, but not after "et al", "e.g", "i.e", "eq" or "vs"
            for m in re.finditer(r".+?(?:(?<!al)(?<!\.g)(?<!\.e)(?<!eq)(?<!vs)[.!?](?=\s)|$)", text):
                if m.group(0).strip():
                    line = starts[max(i for i, o in enumerate(offsets) if o <= m.start())]
                    out.append((line, m.group(0)))
            paragraph.clear()

    for n, text in lines:
        if text.strip():
            paragraph.append((n, text.strip()))
        else:
            flush()
    flush()
    return out


def typed_numbers(markdown: str) -> list[Violation]:
    """Digits in running text that no glue, reference or definitional constant accounts for.

    Exercises and their solutions are skipped (their numbers are the reader's parameters), and so is
    a sentence that quotes a source (a paper's reported setting is not this book's measurement).
    """
    found = []
    for n, text in sentences(prose_lines(markdown, skip=("exercise", "solution"))):
        if QUOTES_A_SOURCE.search(text):
            continue
        numbers = re.findall(r"\d+(?:[.,]\d+)*", ALLOWED_RE.sub(" ", text))
        if numbers:
            found.append((n, f"typed number(s) {', '.join(numbers)}: glue it, or compute it on the page"))
    return found


def structure(markdown: str) -> list[Violation]:
    """A labelled title, a citation, and exercises that each have a solution."""
    problems = []
    title = re.search(r"^\((ch-[\w-]+)\)=\s*\n# ", markdown, re.M)
    if title is None:
        problems.append((1, "the title needs a label: (ch-name)= on the line above '# Title'"))
    if "{cite}" not in markdown and "{cite:" not in markdown:
        problems.append((1, "the chapter cites no source ({cite}`key`)"))
    exercises = re.findall(r"\{exercise\}", markdown)
    solutions = re.findall(r"\{solution\}", markdown)
    if not exercises:
        problems.append((1, "the chapter has no exercises"))
    if len(solutions) != len(exercises):
        problems.append((1, f"{len(exercises)} exercises but {len(solutions)} solutions"))
    return problems


def page_functions(markdown: str, allowed: frozenset[str] = frozenset()) -> list[Violation]:
    """Functions and classes defined in executed code cells with more than MAX_FUNCTION_LINES lines."""
    problems, lines = [], markdown.split("\n")
    in_cell = False
    for n, line in enumerate(lines):
        if line.startswith("```{code-cell}"):
            in_cell = True
            continue
        if in_cell and line.startswith("```"):
            in_cell = False
            continue
        m = re.match(r"^(def|class) (\w+)", line) if in_cell else None
        if m and m.group(2) not in allowed:
            body = 0
            for later in lines[n + 1 :]:
                if later.startswith("```") or (later.strip() and not later[:1].isspace()):
                    break
                body += bool(later.strip())
            if body > MAX_FUNCTION_LINES:
                problems.append((n + 1, f"{m.group(1)} {m.group(2)} ({body} lines) is an algorithm on the page: "
                                        "move it into code/agm, test it, import it"))
    return problems


def self_reference(markdown: str) -> list[Violation]:
    """Phrases about goals, targets or the making of the book."""
    return [(n, f"speaks of the book's own development: {m.group(0)!r}")
            for n, text in prose_lines(markdown) for m in [SELF_REFERENCE.search(text)] if m]


def chapters(root: Path) -> list[Path]:
    """The numbered chapter files under ``root`` (book/<module>/NN-slug.md)."""
    return sorted(p for p in root.rglob("*.md") if re.match(r"\d\d-", p.name))
