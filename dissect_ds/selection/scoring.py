"""Pure, vectorised scoring and ranking functions (no collectives, no state).

Everything here works on whole tensors of one batch; none of it loops over samples.
Shapes: ``b`` rows of this rank, ``B`` rows of the global batch, ``D`` embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dissect_ds.model import Features


def clip_score(f: Features) -> torch.Tensor:
    """s(i) = max(0, 100 * cos(img_i, txt_i)): ``[b]`` float32 (the correlation of docs/method.md)."""
    return (100.0 * (f.image.float() * f.text.float()).sum(dim=-1)).clamp_min(0.0)


def differential(historical: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """d_i = (h_i - mean(h)) - (c_i - mean(c)) over the global batch: ``[B]`` -> ``[B]``.

    Large d: the pair's score rose *least* relative to history (kept by DISSect).
    Evaluated as (h_i - c_i) - (mean(h) - mean(c)) so pairs with h_i == c_i (e.g. no
    history yet) get bitwise-equal d, and the top-k breaks their tie at random instead of
    by rounding noise.
    """
    return (historical - current) - (historical.mean() - current.mean())


def per_sample_contrastive_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    offset: int,
    logit_scale: float,
) -> torch.Tensor:
    """Per-sample CLIP loss of this rank's rows against the *global* batch: ``[b]``.

    ``image_local``/``text_local`` are ``[b, D]``, ``image_all``/``text_all`` the gathered
    ``[B, D]``, and local row j is global row ``offset + j``. Sample i's loss is the mean
    of its image->text row cross-entropy and its text->image row cross-entropy, i.e. the
    terms whose batch mean is open_clip's ``ClipLoss`` with gathered features. Computing
    only local rows keeps the cost at b*B per rank and yields losses already indexed by
    local row (the authors ranked global logits but indexed the local batch).
    """
    target = torch.arange(image_local.shape[0], device=image_local.device) + offset
    i2t = logit_scale * image_local.float() @ text_all.float().T
    t2i = logit_scale * text_local.float() @ image_all.float().T
    return 0.5 * (F.cross_entropy(i2t, target, reduction="none") + F.cross_entropy(t2i, target, reduction="none"))


def random_priority(seed: int, step: int, uids: torch.Tensor) -> torch.Tensor:
    """Uniform random priorities for a global batch, a pure function of (seed, step, uids).

    Values are drawn from a CPU generator seeded by (seed, step) and assigned in stable
    uid-sorted order, so
    every rank, any world size, and CPU or GPU runs draw the same ones for the same global
    batch. ``uids``: ``[B]`` int64 -> ``[B]`` float32 on ``uids.device``.
    """
    gen = torch.Generator(device="cpu")
    # Odd multipliers spread (seed, step) over the generator's seed space.
    mixed = int(seed) * 0x9E3779B1 + int(step) * 0x85EBCA77 + 0x27D4EB2F
    gen.manual_seed(mixed % (2**63))
    draws = torch.rand(uids.shape[0], generator=gen).to(uids.device)
    out = torch.empty_like(draws)
    out[torch.argsort(uids, stable=True)] = draws
    return out


def topk_mask(
    priority: torch.Tensor, tiebreak: torch.Tensor, k_per_group: torch.Tensor, group: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the ``k`` largest priorities of each group, ties broken by the larger ``tiebreak``.

    ``priority``: ``[B]`` float (no NaN), ``tiebreak``: ``[B]`` float (the Selector passes
    :func:`random_priority`, so tied pairs are kept in no particular uid order),
    ``group``: ``[B]`` int64 group id in [0, G) (None: one group), ``k_per_group``: ``[G]``
    int64. Returns a ``[B]`` bool mask. Equal (priority, tiebreak) pairs keep their batch
    order, so the result is a pure function of the inputs; three stable sorts,
    O(B log B), no Python loop.
    """
    n = priority.shape[0]
    order = torch.argsort(-tiebreak, stable=True)
    order = order[torch.argsort(-priority[order], stable=True)]
    if group is None:
        group = torch.zeros(n, dtype=torch.long, device=priority.device)
    order = order[torch.argsort(group[order], stable=True)]
    g = group[order]
    counts = torch.bincount(g, minlength=k_per_group.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    rank_in_group = torch.arange(n, device=priority.device) - starts[g]
    mask = torch.zeros(n, dtype=torch.bool, device=priority.device)
    mask[order] = rank_in_group < k_per_group.to(priority.device)[g]
    return mask


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` (``[n]``), ties sharing their average rank: ``[n]`` float64."""
    x = x.double().flatten()
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    # Average 1-based rank of each run of ties: first rank + (count - 1) / 2.
    first = torch.cumsum(counts, 0) - counts + 1
    ranks = torch.empty_like(x)
    ranks[order] = (first.double() + (counts.double() - 1) / 2)[inverse]
    return ranks


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (higher = positive) for ``positive`` labels.

    Rank-based (Mann-Whitney U) with average ranks for ties; ``[n]`` float, ``[n]`` bool.
    NaN when either class is empty.
    """
    positive = positive.flatten().bool()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = average_ranks(scores)[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of ``[n]`` and ``[n]`` (average ranks for ties): a float64 scalar.

    NaN when either side is constant (e.g. a flat differential). Stays on the device, so
    the caller decides when to sync.
    """
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum() / ((ra * ra).sum() * (rb * rb).sum()).sqrt()


def last_occurrence(uids: torch.Tensor) -> torch.Tensor:
    """Indices of the last occurrence of each distinct uid in ``uids`` (``[B]`` -> ``[U]``).

    Used so a uid seen twice in one global batch is written once, deterministically
    (index_put with duplicate indices has no defined winner on GPU).
    """
    uniq, inverse = torch.unique(uids, return_inverse=True)
    if uniq.shape[0] == uids.shape[0]:
        return torch.arange(uids.shape[0], device=uids.device)
    pos = torch.arange(uids.shape[0], device=uids.device)
    last = torch.full((uniq.shape[0],), -1, dtype=torch.long, device=uids.device)
    return last.scatter_reduce(0, inverse, pos, reduce="amax")
