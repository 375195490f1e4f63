"""Selection diagnostics: per-step metrics, per-pair records, per-epoch noise AUROC."""

from __future__ import annotations

import json
import os

import torch

from dissect_ds.selection.scoring import auroc
from dissect_ds.selection.strategies import ScoredBatch


def score_vectors(sb: ScoredBatch) -> dict[str, torch.Tensor]:
    """The global ``[B]`` score vectors known this step, by short name."""
    named = {"current": sb.current, "historical": sb.historical, "differential": sb.differential, "loss": sb.loss}
    return {k: v for k, v in named.items() if v is not None}


def step_metrics(sb: ScoredBatch, mask: torch.Tensor, scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """Global selection statistics (identical on every rank: all inputs are global).

    ``mask``: ``[B]`` bool. Keys: ``selected``, ``selection/rate_effective``,
    ``selection/{current,historical,differential,loss}_{sel,rej}`` (means over the selected
    / rejected pairs, for the scores that exist and non-empty sides), and with noise labels
    ``selection/clean_precision`` (clean share of the selected labelled pairs) and
    ``selection/noisy_recall`` (share of the noisy pairs rejected). One host sync.
    """
    sel = mask.float()
    rej = 1.0 - sel
    known = sb.noisy >= 0
    clean = (sb.noisy == 0).float()
    noisy = (sb.noisy == 1).float()
    parts = [sel.sum(), rej.sum(), (mask & known).float().sum(), (sel * clean).sum(), noisy.sum(), (rej * noisy).sum()]
    for v in scores.values():
        parts += [(v * sel).sum(), (v * rej).sum()]
    vals = torch.stack([p.float() for p in parts]).tolist()
    n_sel, n_rej, n_sel_known, n_sel_clean, n_noisy, n_rej_noisy = vals[:6]
    total = n_sel + n_rej
    out = {"selected": n_sel, "selection/rate_effective": n_sel / total if total else 0.0}
    for i, name in enumerate(scores):
        s_sel, s_rej = vals[6 + 2 * i : 8 + 2 * i]
        if n_sel:
            out[f"selection/{name}_sel"] = s_sel / n_sel
        if n_rej:
            out[f"selection/{name}_rej"] = s_rej / n_rej
    if n_sel_known:
        out["selection/clean_precision"] = n_sel_clean / n_sel_known
    if n_noisy:
        out["selection/noisy_recall"] = n_rej_noisy / n_noisy
    return out


class NoiseAuroc:
    """Accumulates (current, differential, clean) over an epoch for the clean-vs-noisy AUROC.

    Only pairs with a noise label are kept, on CPU; each signal counts as "higher =
    clean". Keep one per process and feed it only where the result is used (rank 0).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._current: list[torch.Tensor] = []
        self._current_clean: list[torch.Tensor] = []
        self._diff: list[torch.Tensor] = []
        self._diff_clean: list[torch.Tensor] = []

    def add(self, sb: ScoredBatch) -> None:
        known = sb.noisy >= 0
        if not bool(known.any()):
            return
        clean = (sb.noisy == 0)[known].cpu()
        if sb.current is not None:
            self._current.append(sb.current[known].cpu())
            self._current_clean.append(clean)
        d = sb.differential
        if d is not None:
            self._diff.append(d[known].cpu())
            self._diff_clean.append(clean)

    def compute_and_reset(self) -> dict[str, float]:
        """``selection/auroc_current`` / ``selection/auroc_differential`` where data exist."""
        out = {}
        for key, scores, clean in (
            ("selection/auroc_current", self._current, self._current_clean),
            ("selection/auroc_differential", self._diff, self._diff_clean),
        ):
            if scores:
                value = auroc(torch.cat(scores), torch.cat(clean))
                if value == value:  # NaN when one class never appeared
                    out[key] = value
        self.reset()
        return out


class Recorder:
    """Appends one JSON line per scored pair of this rank's rows to ``<run_dir>/selection/rank{R}.jsonl``.

    Fields: step (optimizer step), micro (its micro-batch), uid, current, historical,
    differential, selected, and noisy where known;
    null for a score the strategy does not compute. Opt-in (``selection.record``): the
    formatting is per-row Python, unlike the selection itself. After a resume, steps
    between the checkpoint and the interruption appear twice (the later line wins).
    """

    def __init__(self, run_dir: str, rank: int) -> None:
        os.makedirs(os.path.join(run_dir, "selection"), exist_ok=True)
        self.path = os.path.join(run_dir, "selection", f"rank{rank}.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across steps

    def write(self, sb: ScoredBatch, rows: slice, mask: torch.Tensor) -> None:
        """Record the global rows ``rows`` (this rank's); ``mask`` is the global ``[B]`` mask."""
        n = rows.stop - rows.start
        cols = {
            "uid": sb.uids[rows].tolist(),
            "selected": mask[rows].tolist(),
            "noisy": sb.noisy[rows].tolist(),
        }
        for name in ("current", "historical", "differential"):
            v = getattr(sb, name)
            cols[name] = v[rows].tolist() if v is not None else [None] * n
        lines = []
        for i in range(n):
            row = {"step": sb.step, "micro": sb.micro, "uid": cols["uid"][i], "current": cols["current"][i]}
            row.update(historical=cols["historical"][i], differential=cols["differential"][i])
            row["selected"] = cols["selected"][i]
            if cols["noisy"][i] >= 0:
                row["noisy"] = bool(cols["noisy"][i])
            lines.append(json.dumps(row) + "\n")
        self._file.write("".join(lines))
        # One write + flush per step: a killed job keeps every step recorded so far.
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
