"""Retrieval (image->text, text->image R@1/5/10) and zero-shot classification on the
val shards. Every rank encodes its share; results do not depend on the world size."""

from __future__ import annotations

import torch

from dissect_ds import distributed as D
from dissect_ds.data import DataConfig, iter_val, read_classnames

TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.")


def retrieval_ranks(image: torch.Tensor, text: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of the matching pair for every query (0 = best): ``(i2t [N], t2i [N])``.
    Pair i is image[i] with text[i]; computed in row chunks to bound memory."""

    def ranks(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, q.shape[0], chunk):
            sim = q[s : s + chunk] @ k.T
            pos = sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])]
            # "not <=" rather than ">": a NaN similarity outranks the match, and a NaN match is
            # never found, so a diverged model scores 0 instead of a perfect R@1 from all-false
            # comparisons.
            rank = (~(sim <= pos[:, None])).sum(1)
            out.append(rank.masked_fill(pos.isnan(), torch.iinfo(torch.long).max))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    return ranks(image, text), ranks(text, image)


def recall_metrics(image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    i2t, t2i = retrieval_ranks(image, text)
    out = {}
    for k in (1, 5, 10):
        out[f"eval/i2t_R@{k}"] = float((i2t < k).float().mean())
        out[f"eval/t2i_R@{k}"] = float((t2i < k).float().mean())
    out["eval/mean_R@1"] = (out["eval/i2t_R@1"] + out["eval/t2i_R@1"]) / 2
    return out


@torch.no_grad()
def zeroshot_top1(engine, image: torch.Tensor, labels: torch.Tensor, classnames: list[str]) -> float:
    prompts = [t.format(c) for c in classnames for t in TEMPLATES]
    text = engine.encode_text(engine.tokenizer(prompts)).cpu()
    text = text.view(len(classnames), len(TEMPLATES), -1).mean(1)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = image @ text.T
    hit = (logits.argmax(1) == labels) & torch.isfinite(logits).all(1)
    return float(hit.float().mean())


@torch.no_grad()
def evaluate(engine, data: DataConfig, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
    """Collective: every rank must call it. Returns the same metrics on every rank."""
    images, texts, uids, labels = [], [], [], []
    it = iter_val(
        data,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        preprocess=engine.preprocess_val,
        tokenizer=engine.tokenizer,
    )
    spare = None
    while True:
        batch = next(it, None)
        # Ranks hold different numbers of val batches; under ZeRO-3 each forward is a
        # collective, so a finished rank keeps encoding a spare batch and drops it.
        if not D.all_reduce(torch.tensor([batch is not None], dtype=torch.long), "max")[0]:
            break
        f = engine.encode(batch if batch is not None else spare)
        if batch is None:
            continue
        spare = batch
        images.append(f.image.cpu())
        texts.append(f.text.cpu())
        uids.append(batch.uids)
        if batch.labels is not None:
            labels.append(batch.labels)
    dim = engine.encode_text(engine.tokenizer(["x"])).shape[1]
    local = [torch.cat(x) if x else torch.zeros(0, dim) for x in (images, texts)]
    local_uids = torch.cat(uids) if uids else torch.zeros(0, dtype=torch.long)
    sizes = D.all_gather_sizes(local_uids.shape[0], "cpu")
    image, text = (D.all_gather_cat(x, sizes) for x in local)
    order = D.all_gather_cat(local_uids, sizes).argsort()
    image, text = image[order], text[order]
    metrics = recall_metrics(image, text)
    classnames = read_classnames(data)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    labelled = torch.tensor([int(local_labels.numel() == local_uids.numel())])
    if classnames and D.all_reduce(labelled, "min")[0] == 1:
        all_labels = D.all_gather_cat(local_labels, sizes)[order]
        metrics["eval/zeroshot_top1"] = zeroshot_top1(engine, image, all_labels, classnames)
    return metrics
