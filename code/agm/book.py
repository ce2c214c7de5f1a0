"""Building the book: ``python -m agm.book build [--smoke]`` and ``python -m agm.book check-offline``.

jupyter-cache keys a notebook on its cells' text, so a change in ``code/agm`` alone would leave
old outputs on the page. Each build therefore fingerprints what the chapters execute against
(the package, the checkpoints, the pinned requirements); when the fingerprint differs from the
one the previous build recorded, that build's outputs and execution cache are discarded and every
chapter runs again. A prose-only edit leaves the fingerprint alone and re-executes nothing.

Smoke builds (``AGM_SMOKE=1``) and full builds never share an output folder or a cache.

Sphinx executes one notebook at a time. Before it runs, :func:`execute_ahead` executes the chapters
that the cache lacks several at a time (``--jobs``, default: up to four, each with its share of the
cores) and stores them in the cache, where Sphinx finds them as it would its own executions. A chapter
that fails there is left out of the cache, so Sphinx runs it again and reports the error in place.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from agm.runtime import REPO_ROOT

FINGERPRINT_GLOBS = ("code/agm/**/*.py", "checkpoints/*", "requirements.txt")
FINGERPRINT_FILE = ".agm-fingerprint"
TIMEOUT_S = {"full": 600, "smoke": 120}
OFFLINE_PAGE = "book/foundations/01-basics.html"


def fingerprint(root: Path, globs=FINGERPRINT_GLOBS) -> str:
    """sha256 over the relative paths and contents of every file the chapters depend on."""
    h = hashlib.sha256()
    files = sorted({p for g in globs for p in root.glob(g) if p.is_file() and "__pycache__" not in p.parts})
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def path_output(root: Path, smoke: bool) -> Path:
    """Jupyter Book writes to ``<this>/_build``: ``_build/html`` in full, ``_build/smoke/_build/html`` in smoke.

    ``AGM_BOOK_OUT`` moves a build elsewhere (for example to build twice side by side).
    """
    if os.environ.get("AGM_BOOK_OUT"):
        return Path(os.environ["AGM_BOOK_OUT"]) / ("smoke" if smoke else "full")
    return root / "_build" / "smoke" if smoke else root


def build_dir(root: Path, smoke: bool) -> Path:
    return path_output(root, smoke) / "_build"


def discard_stale(out: Path, current: str, log=print) -> bool:
    """Remove a previous build's outputs and cache if it was made from other code. True if removed."""
    stamp = out / FINGERPRINT_FILE
    if stamp.is_file() and stamp.read_text().strip() == current:
        return False
    for name in ("html", ".doctrees", "jupyter_execute", ".jupyter_cache"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    if stamp.exists():
        log("book: code or checkpoints changed since the last build; every chapter will execute again")
    return True


def write_config(root: Path, out: Path, smoke: bool) -> Path:
    """The book's ``_config.yml`` with this build's cache folder and execution timeout."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    execute = config.setdefault("execute", {})
    execute["cache"] = str((out / ".jupyter_cache").resolve())
    execute["timeout"] = TIMEOUT_S["smoke" if smoke else "full"]
    path = out / ".agm-config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


EXTERNAL = re.compile(
    r"""<(?:script[^>]*\ssrc|link[^>]*\shref)=["'](?:https?:)?//[^"']+["']""", re.IGNORECASE
)


def external_assets(html_dir: Path) -> list[str]:
    """Scripts and stylesheets that a page would fetch from another host (must be none)."""
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        for m in EXTERNAL.finditer(page.read_text(errors="ignore")):
            if "rel=\"canonical\"" in m.group(0):
                continue
            found.append(f"{page.relative_to(html_dir)}: {m.group(0)[:120]}")
    return found


def toc_files(root: Path) -> list[Path]:
    """The pages of ``_toc.yml`` in reading order (root, parts' chapters and their sections)."""
    found: list[Path] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    found.append(root / f"{node[key]}.md")
            for value in node.values():
                if isinstance(value, list):
                    for item in value:
                        walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((root / "_toc.yml").read_text()))
    return [p for p in found if p.is_file()]


def default_jobs() -> int:
    """Chapters executed at once: ``AGM_BOOK_JOBS``, else up to four (at least two: one chapter keeps two cores
    busy only part of the time)."""
    return int(os.environ.get("AGM_BOOK_JOBS", "0")) or max(2, min(4, os.cpu_count() or 1))


def _execute(path: str, text: str, timeout: int, env: dict) -> tuple[str, object, float, str | None]:
    """Worker of :func:`execute_ahead`: one chapter executed in a fresh kernel (run in a child process)."""
    from jupyter_cache.executors.utils import single_nb_execution
    from myst_nb.core.read import read_myst_markdown_notebook

    os.environ.update(env)
    notebook = read_myst_markdown_notebook(text, add_source_map=True, path=path)
    result = single_nb_execution(notebook, cwd=str(Path(path).parent), allow_errors=False, timeout=timeout,
                                 meta_override=True)
    return path, notebook, result.time, None if result.err is None else result.exc_string


def execute_ahead(root: Path, out: Path, smoke: bool, env: dict, jobs: int, log=print) -> int:
    """Execute the chapters of the book that the build's cache lacks, ``jobs`` at a time, and cache them.

    The notebooks are read as myst-nb reads them for Sphinx, so the cache keys match. Returns how many
    chapters were executed and cached.
    """
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from myst_nb.core.read import is_myst_markdown_notebook, read_myst_markdown_notebook

    cache = get_cache(str((out / ".jupyter_cache").resolve()))
    todo = []
    for page in toc_files(root):
        text = page.read_text()
        if not is_myst_markdown_notebook(text):
            continue
        try:
            cache.match_cache_notebook(read_myst_markdown_notebook(text, add_source_map=True, path=str(page)))
        except KeyError:
            todo.append((str(page), text))
    if jobs < 2 or len(todo) < 2:
        return 0
    cores = os.cpu_count() or 1
    threads = str(max(1, cores // jobs))
    env = dict(env, AGM_THREADS=os.environ.get("AGM_THREADS", threads),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads))
    timeout = TIMEOUT_S["smoke" if smoke else "full"]
    log(f"book: executing {len(todo)} chapters, {jobs} at a time")
    start, cached = time.perf_counter(), 0
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(_execute, path, text, timeout, env) for path, text in todo]
        for future in concurrent.futures.as_completed(futures):
            path, notebook, seconds, error = future.result()
            name = Path(path).relative_to(root)
            if error is not None:
                log(f"book: {name} failed; the build runs it again to report the error")
                continue
            cache.cache_notebook_bundle(CacheBundleIn(notebook, path, data={"execution_seconds": seconds}),
                                        check_validity=False, overwrite=True)
            cached += 1
            log(f"book: {name} executed in {seconds:.0f} s")
    log(f"book: {cached} chapters executed in {time.perf_counter() - start:.0f} s")
    return cached


def build(root: Path = REPO_ROOT, smoke: bool = False, globs=FINGERPRINT_GLOBS, log=print,
          jobs: int | None = None) -> Path:
    """Build the book under ``root`` incrementally; return the HTML folder."""
    out = build_dir(root, smoke)
    out.mkdir(parents=True, exist_ok=True)
    current = fingerprint(root, globs)
    discard_stale(out, current, log)
    config = write_config(root, out, smoke)
    env = dict(os.environ, AGM_SMOKE="1" if smoke else "0", PYDEVD_DISABLE_FILE_VALIDATION="1")
    execute_ahead(root, out, smoke, env, default_jobs() if jobs is None else jobs, log)
    jupyter_book = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]
    cmd = jupyter_book + ["build", str(root), "--config", str(config), "--toc", str(root / "_toc.yml"),
                          "--path-output", str(path_output(root, smoke)), "-W", "-n", "--keep-going"]
    html = out / "html"
    log(f"book: {'smoke' if smoke else 'full'} build -> {html}")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not (html / "index.html").is_file():
        raise SystemExit(
            f"book: the build failed (exit {proc.returncode}). The warnings above name the chapter and, for an "
            "execution error, the failing cell and its traceback."
        )
    external = external_assets(html)
    if external:
        raise SystemExit("book: pages load assets from other hosts (the site must work offline):\n  "
                         + "\n  ".join(external))
    (out / FINGERPRINT_FILE).write_text(current + "\n")
    return html


def check_offline(html: Path, page: str = OFFLINE_PAGE, screenshot: Path | None = None) -> int:
    """Open ``page`` in headless Chromium with every network request refused; count typeset equations."""
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        raise SystemExit("check-offline needs Chromium: install it (Debian/Ubuntu: apt-get install chromium)")
    target = html / page
    if not target.is_file():
        raise SystemExit(f"{target} does not exist; run `make book` first")
    with tempfile.TemporaryDirectory() as profile:
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=15000"]
        dom = subprocess.run(flags + ["--dump-dom", target.as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        if screenshot is not None:
            subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={screenshot}", target.as_uri()],
                           capture_output=True, timeout=120)
    typeset = dom.count("<mjx-container")
    if typeset == 0:
        raise SystemExit(f"check-offline: no equation of {page} was typeset by MathJax with the network off")
    print(f"check-offline: {typeset} equations typeset in {page} with the network off"
          + (f"; screenshot {screenshot}" if screenshot else ""))
    return typeset


def run_chapter(chapter: Path, smoke: bool = True, out: Path | None = None) -> Path:
    """Execute one chapter as a notebook (no Sphinx, no cache), for working on it; returns the executed file.

    A failing cell stops with its traceback. The smoke and full budgets are chosen as in a build.
    """
    if not chapter.is_file() or chapter.suffix != ".md":
        raise SystemExit(f"{chapter} is not a chapter (.md)")
    out = out or REPO_ROOT / "_build" / "chapters" / ("smoke" if smoke else "full") / chapter.with_suffix(".ipynb").name
    out.parent.mkdir(parents=True, exist_ok=True)
    import nbformat
    from myst_nb.core.read import read_myst_markdown_notebook
    from nbclient import NotebookClient

    notebook = read_myst_markdown_notebook(chapter.read_text())
    previous = os.environ.get("AGM_SMOKE")
    os.environ["AGM_SMOKE"] = "1" if smoke else "0"
    try:
        NotebookClient(notebook, timeout=TIMEOUT_S["smoke" if smoke else "full"], kernel_name="python3",
                       resources={"metadata": {"path": str(chapter.parent.resolve())}}).execute()
    finally:
        os.environ.pop("AGM_SMOKE") if previous is None else os.environ.update(AGM_SMOKE=previous)
        nbformat.write(notebook, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agm.book")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the book (incremental; stale outputs are discarded)")
    b.add_argument("--smoke", action="store_true", help="AGM_SMOKE=1 budgets, into _build/smoke")
    b.add_argument("--jobs", type=int, default=None,
                   help="chapters executed at once (default: AGM_BOOK_JOBS, else up to 4; 1: one at a time)")
    r = sub.add_parser("run", help="execute one chapter as a notebook, without building the book")
    r.add_argument("chapter", type=Path, nargs="+")
    r.add_argument("--full", action="store_true", help="full budgets instead of smoke budgets")
    c = sub.add_parser("check-offline", help="render Chapter 1 in headless Chromium with no network")
    c.add_argument("--smoke", action="store_true", help="check the smoke build instead of the full one")
    c.add_argument("--screenshot", type=Path, default=REPO_ROOT / "_build" / "offline-check.png")
    args = p.parse_args(argv)
    if args.command == "build":
        html = build(smoke=args.smoke, jobs=args.jobs)
        print(f"book: done; open {html / 'index.html'}")
    elif args.command == "run":
        for chapter in args.chapter:
            print(f"book: executed {chapter} -> {run_chapter(chapter, smoke=not args.full)}")
    else:
        check_offline(build_dir(REPO_ROOT, args.smoke) / "html", screenshot=args.screenshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
