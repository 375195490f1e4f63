"""``make bench``: run the benchmarks and assemble ``docs/benchmarks.md``.

``docs/benchmarks.md`` = a header (machine, date, command) + ``docs/bench/perf.md``
(throughput, overhead, memory, loader; written here) + ``docs/bench/accuracy.md`` (written by
``benchmarks.accuracy.main(argv)`` when that module exists).

    python -m benchmarks.run_all [--quick] [--only throughput,overhead,memory,loader,accuracy]
                                 [--out DOCS_DIR] [--work SCRATCH_DIR]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import common as c

PERF_PARTS = ("throughput", "overhead", "memory", "loader")
PARTS = (*PERF_PARTS, "accuracy")


def run_accuracy(quick: bool, out: Path, work: Path) -> bool:
    """Call ``benchmarks.accuracy.main`` (it writes ``bench/accuracy.md`` under the docs
    directory, its plots under ``img/``); False when that module is not there."""
    try:
        accuracy = importlib.import_module("benchmarks.accuracy")
    except ModuleNotFoundError as e:
        if e.name != "benchmarks.accuracy":
            raise
        print("run_all: benchmarks.accuracy not found: skipping the accuracy benchmark", flush=True)
        return False
    argv = ["--quick"] if quick else []
    if out.resolve() != c.DOCS.resolve():  # its default is docs/bench + docs/img
        argv += ["--out", str(out / "bench"), "--work", str(work / "accuracy")]
    accuracy.main(argv)
    return True


_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def rebase_links(text: str, src_dir: Path, dst_dir: Path) -> str:
    """Relative markdown link targets of a page in ``src_dir``, made relative to
    ``dst_dir`` (accuracy.md links its plots from docs/bench/, benchmarks.md is in docs/)."""

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^([a-z]+:|#|/)", target):
            return m.group(0)
        return m.group(1) + os.path.relpath(src_dir / target, dst_dir) + m.group(3)

    return _LINK.sub(fix, text)


def header(took: str = "", only: tuple[str, ...] = PARTS, command: str = "") -> str:
    when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    command = command or f"python -m benchmarks.run_all --only {','.join(only)}"
    how = (
        f"Generated on {when} by `make bench`"
        if set(only) >= set(PARTS)
        else f"Updated on {when} by `{command}` (the other sections "
        "are from earlier runs and carry their own dates); the whole page comes from `make bench`"
    )
    return "\n".join(
        [
            "# Benchmarks",
            "",
            how + " (`.venv/bin/python -m benchmarks.run_all`; `--only PART` reruns one part). Each section names "
            "the command that reproduces it and how long it took."
            + (f" This run of the parts it lists: {took}." if took else ""),
            "",
            c.machine_line(),
        ]
    )


def demote_headings(text: str) -> str:
    """One more ``#`` on every markdown heading outside code fences (a page's title
    becomes a section of benchmarks.md, whose only top-level heading is its own)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if not fenced and line.startswith("#") else line)
    return "\n".join(lines)


def assemble(out: Path, took: str = "", only: tuple[str, ...] = PARTS, command: str = "") -> Path:
    """Write ``out/benchmarks.md`` from the header and whichever parts exist (``command``: what
    updated them, when not run_all)."""
    parts = [header(took, only, command)]
    for path in (out / "bench" / "perf.md", out / "bench" / "accuracy.md"):
        if path.exists():
            text = rebase_links(path.read_text().strip(), path.parent, out)
            parts.append(demote_headings(text) if text.startswith("# ") else text)
    target = out / "benchmarks.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n\n".join(p for p in parts if p) + "\n")
    return target


def run(quick: bool, only: tuple[str, ...], out: Path, work: Path) -> dict[str, object]:
    """Run the parts in ``only`` (in :data:`PARTS` order); return each perf part's result."""
    results: dict[str, object] = {}
    durations: dict[str, float] = {}
    for name in (p for p in PARTS if p in only):
        t0 = time.perf_counter()
        if name == "accuracy":
            if not run_accuracy(quick, out, work):
                continue
        else:
            module = importlib.import_module(f"benchmarks.{name}")
            results[name] = module.run(quick, work)
            text = module.render(results[name])
            print(text, flush=True)
            c.write_section(out / "bench" / "perf.md", name, text)
        durations[name] = time.perf_counter() - t0
    took = ", ".join(f"{name} {sec / 60:.1f} min" for name, sec in durations.items())
    took = f"{sum(durations.values()) / 60:.1f} min ({took})"
    print(f"run_all: wrote {assemble(out, took, only)} ({took})", flush=True)
    return results


def _parts(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description="Run the benchmarks (make bench).")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat (the smoke test)")
    p.add_argument("--only", type=_parts, default=PARTS, help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out", type=Path, default=c.DOCS, help="docs directory: OUT/benchmarks.md, OUT/bench/perf.md")
    p.add_argument("--work", type=Path, default=c.WORK, help="scratch directory for data, runs and logs")
    args = p.parse_args(argv)
    run(args.quick, args.only, args.out, args.work)


if __name__ == "__main__":
    main()
