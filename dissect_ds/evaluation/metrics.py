"""Pure metric functions on gathered features (no collectives, no model)."""

from __future__ import annotations

import torch


def retrieval_recalls(
    image: torch.Tensor,
    text: torch.Tensor,
    caption_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways with several captions per image.

    ``image [N, D]``, ``text [T, D]`` normalised; ``caption_image [T]`` the image each
    caption describes. Image->text is a hit at k when any of the image's captions is
    among its k best texts; text->image when the caption's image is among its k best
    images. Ties count against the query. Keys ``i2t_R@k``, ``t2i_R@k``, ``mean_R@1``.
    """
    n, t = image.shape[0], text.shape[0]
    i2t = torch.empty(n, dtype=torch.long)
    t2i = torch.zeros(t, dtype=torch.long)
    pos_t = torch.empty(t)
    rows = torch.arange(n)
    for s in range(0, n, chunk):
        sim = image[s : s + chunk] @ text.T  # [c, T]
        own = caption_image[None, :] == rows[s : s + chunk, None]
        best = sim.masked_fill(~own, float("-inf")).max(1).values
        i2t[s : s + chunk] = (sim > best[:, None]).sum(1)
        mine = (caption_image >= s) & (caption_image < s + chunk)
        idx = mine.nonzero().squeeze(1)
        pos_t[idx] = sim[caption_image[idx] - s, idx]
    for s in range(0, n, chunk):  # second pass: every caption's positive score is known now
        sim = image[s : s + chunk] @ text.T
        t2i += (sim > pos_t[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t < k).float().mean()) if n else 0.0
        out[f"t2i_R@{k}"] = float((t2i < k).float().mean()) if t else 0.0
    out["mean_R@1"] = (out["i2t_R@1"] + out["t2i_R@1"]) / 2
    return out


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """``[len(ks)]`` counts of rows whose label is among the k highest logits
    (``logits [n, C]``, ``labels [n]``); k is capped at C."""
    if logits.shape[0] == 0:
        return torch.zeros(len(ks), dtype=torch.long)
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, :k].any(1).sum() for k in ks])
