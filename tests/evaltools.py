"""A tiny CLIP fitted for a few seconds on synthetic labelled images, so that zero-shot
predictions differ between images (an untrained model names one class for all)."""

from __future__ import annotations

import torch


def fit_tiny(folder: str, steps: int = 25, seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of ``dissect-tiny-vit`` trained on ``folder`` (an ImageFolder) with
    captions "a photo of a <class>." and open_clip's contrastive loss."""
    import open_clip
    from torchvision.datasets import ImageFolder

    from dissect_ds.model import build_model

    torch.manual_seed(seed)
    model, preprocess, _, tokenizer = build_model("dissect-tiny-vit")
    data = ImageFolder(folder, transform=preprocess)
    images = torch.stack([x for x, _ in data])
    tokens = tokenizer([f"a photo of a {data.classes[y]}." for y in data.targets])
    loss = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        out = model(images, tokens)
        opt.zero_grad()
        loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        opt.step()
    return model.state_dict()
