"""``python -m explainer report``: docs/RESULTS.md from one or more results.json files of ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser

from explainer.core.io import atomic_write_text
from explainer.pipelines.args import parse
from explainer.pipelines.evaluate import markdown_table


def render(results: list[tuple[str, dict]], title: str, preamble: str = "") -> str:
    parts = [f"# {title}", "", preamble.strip(), ""] if preamble else [f"# {title}", ""]
    for command, res in results:
        table = markdown_table(res)
        body = table.split("\n", 2)[2]  # drop the table's own title line
        parts += [f"## {res['num_images']} images, {len(res['methods'])} methods", "",
                  f"Reproduce: `{command}`", "", body]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m explainer report", description=__doc__)
    p.add_argument("--results", type=list[str], required=True, help="RESULTS.json=COMMAND pairs")
    p.add_argument("--out", default="docs/RESULTS.md")
    p.add_argument("--title", default="Results on the embedded benchmark")
    p.add_argument("--preamble", default="", help="a markdown file put under the title")
    a = parse(p, argv)
    items = []
    for pair in a.results:
        path, _, command = pair.partition("=")
        items.append((command or f"python -m explainer evaluate ... --out {path}", json.loads(Path(path).read_text())))
    pre = Path(a.preamble).read_text() if a.preamble else ""
    atomic_write_text(a.out, render(items, a.title, pre))
    print(f"wrote {a.out}")
    return 0

