"""``python -m dissect_ds.summary RUN_DIR``: a short table of a finished run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from dissect_ds.metrics import read_metrics


def noise_rate(train_spec: str) -> float | None:
    """The data set's true noise rate, from the synthetic generator's manifest if present."""
    info = Path(train_spec) / "info.json"
    return json.loads(info.read_text()).get("noise_rate") if info.is_file() else None


def summarize(run_dir: Path) -> list[tuple[str, str]]:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    lines = read_metrics(run_dir)
    steps = [m for m in lines if "loss" in m]
    final = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
    tail = steps[-max(1, len(steps) // 10) :]
    rows = [
        ("run dir", str(run_dir)),
        ("strategy", f"{cfg['selection']['strategy']} (rate {cfg['selection']['rate']})"),
        ("steps", str(steps[-1]["step"] if steps else 0)),
        ("samples/s (median)", f"{sorted(m['samples/s'] for m in steps)[len(steps) // 2]:.1f}" if steps else "-"),
        ("final loss", f"{steps[-1]['loss']:.4f}" if steps else "-"),
    ]
    for key, label in (
        ("eval/i2t_R@1", "val i2t R@1"),
        ("eval/t2i_R@1", "val t2i R@1"),
        ("eval/zeroshot_top1", "zero-shot top-1"),
    ):
        if key in final:
            rows.append((label, f"{final[key]:.3f}"))
    precision = [m["selection/clean_precision"] for m in tail if "selection/clean_precision" in m]
    if precision:
        nr = noise_rate(cfg["data"]["train"])
        random = f" (random selection: {1 - nr:.3f})" if nr is not None else ""
        rows.append(("clean precision, last 10% of steps", f"{sum(precision) / len(precision):.3f}{random}"))
    rows.append(("tensorboard", f"tensorboard --logdir {run_dir / 'tensorboard'}"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description="Print the summary table of a finished run.")
    p.add_argument("run_dir", type=Path)
    rows = summarize(p.parse_args().run_dir)
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows) + "\n")


if __name__ == "__main__":
    main()
