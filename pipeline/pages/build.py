"""Write every generated page, or check that each one equals what its JSON gives.

``PAGES`` maps each page (relative to the repository root) to its renderer, a function of the root that
reads the JSON it needs there. Pages are plain functions of their JSON, with no clock and no machine in
them, so rendering twice gives the same bytes and ``--check`` can compare them exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from pipeline.pages import bench, results, scale

ROOT = Path(__file__).resolve().parents[2]

PAGES: dict[str, Callable[[Path], str]] = {
    bench.PAGE: bench.bench_page,
    results.PAGE: results.results_page,
    scale.PAGE: scale.scale_page,
}


def render(root: Path) -> dict[str, str]:
    """Each page's text as its JSON under ``root`` gives it."""
    return {page: fn(root).rstrip("\n") + "\n" for page, fn in PAGES.items()}


def stale_pages(root: Path) -> list[str]:
    """The pages under ``root`` that are missing or differ from what their JSON gives."""
    out = []
    for page, text in render(root).items():
        path = root / page
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(page)
    return out


def write_pages(root: Path) -> list[str]:
    """Write the pages that changed; return them."""
    changed = stale_pages(root)
    texts = render(root)
    for page in changed:
        path = root / page
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(texts[page], encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.pages", description=__doc__)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale page")
    ap.add_argument("--root", type=Path, default=ROOT, help="the repository root (default: this checkout)")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_pages(args.root)
        for page in stale:
            print(f"stale: {page} differs from its JSON; run python -m pipeline.pages")
        return 1 if stale else 0
    for page in write_pages(args.root):
        print(f"wrote {page}")
    return 0
