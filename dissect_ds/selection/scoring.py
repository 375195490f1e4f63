"""Pure, vectorised scoring and ranking functions (no collectives, no state).

Everything here works on whole tensors of one batch; none of it loops over samples.
Shapes: ``b`` rows of this rank, ``B`` rows of the global batch, ``D`` embedding width.
"""

from __future__ import annotations

import math

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


def random_priority(seed: int, step: int, uids: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """Uniform random priorities in [0, 1) for a global batch, a pure function of (seed,
    step, stream, uids); ``stream`` gives independent draws for one step.

    Values are drawn from a CPU generator seeded by (seed, step, stream) and assigned in
    stable uid-sorted order, so every rank, any world size, and CPU or GPU runs draw the
    same ones for the same global batch. ``uids``: ``[B]`` int64 -> ``[B]`` float32 on
    ``uids.device``.
    """
    gen = torch.Generator(device="cpu")
    # Odd multipliers spread (seed, step, stream) over the generator's seed space.
    mixed = int(seed) * 0x9E3779B1 + int(step) * 0x85EBCA77 + int(stream) * 0xC2B2AE3D + 0x27D4EB2F
    gen.manual_seed(mixed % (2**63))
    draws = torch.rand(uids.shape[0], generator=gen).to(uids.device)
    out = torch.empty_like(draws)
    out[torch.argsort(uids, stable=True)] = draws
    return out


def batch_logits(f: Features) -> torch.Tensor:
    """``[B, B]`` image-to-text logits ``logit_scale * img_i . txt_j`` of one model's features."""
    return f.logit_scale * f.image.float() @ f.text.float().T


def pair_losses(logits: torch.Tensor) -> torch.Tensor:
    """Per-pair contrastive loss of every pair against the whole batch, from ``[B, B]`` logits:
    the mean of its image->text and text->image cross-entropies, ``[B]``."""
    diag = logits.diagonal()
    return 0.5 * ((logits.logsumexp(dim=1) - diag) + (logits.logsumexp(dim=0) - diag))


def loss_increase(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """For every pair j, how much the *summed* contrastive loss of the sub-batch ``chosen``
    grows when j joins it: ``L(S + {j}) - L(S)``, ``[B]`` (meaningless where ``chosen``).

    ``logits``: ``[B, B]`` (:func:`batch_logits`); ``chosen``: ``[B]`` bool, S, not empty.
    L(S) sums, over the pairs i of S, half the image->text and text->image cross-entropies
    of i among S. When j joins, each i of S gains j as a negative (its log-sum-exp over S
    absorbs exp(logit)), and j adds its own two terms against S + {j}. O(B |S|).
    """
    diag = logits.diagonal()
    rows, cols = logits[chosen], logits[:, chosen]  # [s, B]: logits[i, j]; [B, s]: logits[j, i]; i in S
    lse_row = cols.logsumexp(dim=1)  # [B]: log sum over m in S of exp(logits[j, m])
    lse_col = rows.logsumexp(dim=0)  # [B]: log sum over m in S of exp(logits[m, j])
    r, c = lse_row[chosen], lse_col[chosen]  # the members' own sums over S
    i2t = (torch.logaddexp(r[:, None], rows) - r[:, None]).sum(dim=0) + torch.logaddexp(lse_row, diag) - diag
    t2i = (torch.logaddexp(c[None, :], cols) - c[None, :]).sum(dim=1) + torch.logaddexp(lse_col, diag) - diag
    return 0.5 * (i2t + t2i)


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniforms in [0, 1): adding it to logits and taking the top m
    samples m items without replacement from their softmax."""
    u = uniform.double().clamp(1e-12, 1.0 - 1e-12)
    return -torch.log(-torch.log(u))


def jest_mask(
    learner: Features, reference: Features, k: int, chunks: int, seed: int, step: int, uids: torch.Tensor
) -> torch.Tensor:
    """JEST's joint selection of ``k`` of the B pairs: ``[B]`` bool.

    ``learner`` and ``reference`` are the *global* ``[B, D]`` features of both models
    (identical on every rank). The k pairs are drawn in ``chunks`` chunks of k / chunks,
    each sampled without replacement (Gumbel top-m, noise seeded by (seed, step, chunk)) from
    the softmax of every remaining pair's learnability: the learner's loss increase minus
    the reference's (:func:`loss_increase`) given the pairs drawn so far. A single pair has
    no negatives, so the first chunk uses each pair's learnability against the whole batch
    instead. O(B^2) memory for the two logit matrices.
    """
    learner_logits, reference_logits = batch_logits(learner), batch_logits(reference)
    n = learner_logits.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=learner_logits.device)
    if k % chunks:
        raise ValueError(f"jest: {chunks} chunks do not divide the {k} pairs to keep (selection.jest_chunks)")
    per_chunk = k // chunks
    no_tiebreak = torch.zeros(n, device=chosen.device)
    for c in range(chunks):
        if c == 0:
            score = pair_losses(learner_logits) - pair_losses(reference_logits)
        else:
            score = loss_increase(learner_logits, chosen) - loss_increase(reference_logits, chosen)
        keys = score.double() + gumbel(random_priority(seed, step, uids, stream=1 + c)).to(score.device)
        keys = keys.masked_fill(chosen, -math.inf)
        chosen |= topk_mask(keys, no_tiebreak, torch.tensor([per_chunk]))
    return chosen


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
