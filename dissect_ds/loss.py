"""CLIP contrastive loss over features gathered from all ranks.

Each rank scores its local rows against the global columns (open_clip's
``local_loss=True, gather_with_grad=True`` scheme) but, unlike open_clip, ranks may hold
different numbers of rows, including zero, because selection keeps a different number
of pairs on each rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dissect_ds import distributed as D


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    sizes: list[int],
    rank: int,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over the concatenation of every rank's rows.

    image, text: ``[n_r, D]`` normalised features of this rank (n_r = sizes[rank], may be 0).
    Returns ``(loss_to_backward, loss)``: ``loss`` is the global mean loss (identical on every
    rank, detached); ``loss_to_backward`` is this rank's share scaled by the world size, so
    that DeepSpeed's gradient *averaging* over ranks yields the gradient of the global mean.
    """
    world = len(sizes)
    total = sum(sizes)
    d = image.shape[1]
    both = D.all_gather_cat_with_grad(torch.cat([image, text], dim=1), sizes, group)  # one collective, not two
    all_image, all_text = both[:, :d], both[:, d:]
    labels = torch.arange(image.shape[0], device=image.device) + sum(sizes[:rank])
    per_image = F.cross_entropy(logit_scale * image @ all_text.T, labels, reduction="sum")
    per_text = F.cross_entropy(logit_scale * text @ all_image.T, labels, reduction="sum")
    local = (per_image + per_text) / (2 * total)
    loss = D.all_reduce(local.detach().clone(), "sum", group)
    return local * world, loss
