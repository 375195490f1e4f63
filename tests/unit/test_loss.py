"""The gathered contrastive loss equals open_clip's ClipLoss on the concatenated batch,
with equal, uneven and zero row counts per rank; so do the parameter gradients."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from dissect_ds.loss import contrastive_loss
from tests.multiproc import run_ranks

DIM = 8


def _problem(total: int):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(total, DIM, generator=g),
        torch.randn(total, DIM, generator=g),
        torch.randn(DIM, DIM, generator=g),
    )


def _features(x_img, x_txt, weight):
    return F.normalize(x_img @ weight, dim=-1), F.normalize(x_txt @ weight.T, dim=-1)


def _reference(sizes):
    x_img, x_txt, w0 = _problem(sum(sizes))
    w = w0.clone().requires_grad_(True)
    img, txt = _features(x_img, x_txt, w)
    loss = ClipLoss()(img, txt, torch.tensor(10.0))
    loss.backward()
    return float(loss.detach()), w.grad


def _ranked(rank, world, sizes):
    import torch.distributed as dist

    x_img, x_txt, w0 = _problem(sum(sizes))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    w = w0.clone().requires_grad_(True)
    img, txt = _features(x_img[rows], x_txt[rows], w)
    loss_bw, loss = contrastive_loss(img, txt, torch.tensor(10.0), sizes, rank)
    # DeepSpeed averages gradients over ranks; a rank with no rows still joins through
    # a zero-weighted term (as the engine does).
    (loss_bw + 0.0 * w.sum()).backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    return float(loss), grad / world


def _cases(rank, world, cases):
    return [_ranked(rank, world, sizes) for sizes in cases]


CASES = {2: [[4, 4], [3, 5], [6, 0]], 3: [[2, 3, 0], [0, 4, 4], [1, 1, 1]]}


@pytest.mark.slow  # spawns 2-3 gloo ranks (one group per world size, every case in it)
@pytest.mark.parametrize("world", sorted(CASES))
def test_gathered_loss_and_grads_match_single_process(world):
    per_rank = run_ranks(_cases, world, CASES[world])
    for i, sizes in enumerate(CASES[world]):
        ref_loss, ref_grad = _reference(sizes)
        for results in per_rank:
            loss, grad = results[i]
            assert loss == pytest.approx(ref_loss, rel=1e-5), sizes
            torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_single_process_matches_clip_loss():
    x_img, x_txt, w = _problem(7)
    img, txt = _features(x_img, x_txt, w)
    bw, loss = contrastive_loss(img, txt, torch.tensor(10.0), [7], 0)
    assert float(loss) == pytest.approx(float(ClipLoss()(img, txt, torch.tensor(10.0))), rel=1e-6)
    assert float(bw) == pytest.approx(float(loss), rel=1e-6)
