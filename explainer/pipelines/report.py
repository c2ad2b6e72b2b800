"""``python -m explainer report``: docs/RESULTS.md from one or more results.json files of ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser

from explainer.core.io import atomic_write_text
from explainer.pipelines.args import parse
from explainer.pipelines.evaluate import markdown_table

STUDENT_METRICS = ("deletion_auc", "insertion_auc", "pointing_game")


def student_rows(res: dict, pairs: list[tuple[str, str]], tolerance: float = 0.02) -> list[str]:
    """A markdown table: each teacher beside its student, the differences of the metrics that distillation must
    keep (within ``tolerance``) and the student/teacher time ratio for all classes.

    The student gives all ``C`` classes in one forward pass, the teacher one map per class: the ratio is the
    student's seconds per map over ``C`` times the teacher's (seconds per map: ``evaluate``'s method time over its
    maps, one forward pass per map for a student).
    """
    methods, c = res["methods"], len(res.get("class_names") or []) or None
    lines = ["| teacher | student | " + " | ".join(f"Δ {m}" for m in STUDENT_METRICS)
             + f" | within {tolerance} | not worse by more than {tolerance} | student / teacher time, all classes |",
             "|---|---|" + "---:|" * len(STUDENT_METRICS) + "---|---|---:|"]
    for teacher, student in pairs:
        if teacher not in methods or student not in methods:
            continue
        mt, ms = methods[teacher], methods[student]
        diffs = [ms["metrics"].get(m, float("nan")) - mt["metrics"].get(m, float("nan")) for m in STUDENT_METRICS]
        ok = all(abs(d) <= tolerance for d in diffs)
        # how much worse the student is on each metric, by the direction results.json records for it
        specs = res.get("metric_specs", {})
        worse = [d if specs.get(m, {}).get("direction") == "lower" else -d for m, d in zip(STUDENT_METRICS, diffs)]
        not_worse = all(w <= tolerance for w in worse)
        ratio = ms["seconds_per_map"] / (c * mt["seconds_per_map"]) if c else float("nan")
        lines.append(f"| {teacher} | {student} | " + " | ".join(f"{d:+.3f}" for d in diffs)
                     + f" | {'yes' if ok else 'no'} | {'yes' if not_worse else 'no'} | 1/{1 / ratio:.0f} |")
    return lines


def render(results: list[tuple[str, dict]], title: str, preamble: str = "",
           pairs: list[tuple[str, str]] | None = None) -> str:
    parts = [f"# {title}", "", preamble.strip(), ""] if preamble else [f"# {title}", ""]
    for command, res in results:
        table = markdown_table(res)
        body = table.split("\n", 2)[2]  # drop the table's own title line
        parts += [f"## {res['num_images']} images, {len(res['methods'])} methods", "",
                  f"Reproduce: `{command}`", "", body]
        if pairs and any(t in res["methods"] and s in res["methods"] for t, s in pairs):
            parts += ["Teachers and their students:", "", *student_rows(res, pairs), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m explainer report", description=__doc__)
    p.add_argument("--results", nargs="+", type=str, required=True, help="RESULTS.json=COMMAND pairs")
    p.add_argument("--out", default="docs/RESULTS.md")
    p.add_argument("--title", default="Results on the embedded benchmark")
    p.add_argument("--preamble", default="", help="a markdown file put under the title")
    p.add_argument("--pairs", nargs="*", type=str, default=[], help="TEACHER=STUDENT method names side by side")
    a = parse(p, argv)
    items = []
    for pair in a.results:
        path, _, command = pair.partition("=")
        items.append((command or f"python -m explainer evaluate ... --out {path}", json.loads(Path(path).read_text())))
    pre = Path(a.preamble).read_text() if a.preamble else ""
    pairs = [tuple(q.split("=", 1)) for q in a.pairs]
    atomic_write_text(a.out, render(items, a.title, pre, pairs))
    print(f"wrote {a.out}")
    return 0

