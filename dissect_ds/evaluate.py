"""Retrieval (image->text, text->image R@1/5/10) and zero-shot classification on the
val shards, plus the named sets of dissect_ds/evaluation; and the command
``python -m dissect_ds.evaluate`` that evaluates a checkpoint or an export without
training. Every rank encodes its share; results do not depend on the world size."""

from __future__ import annotations

import torch

from dissect_ds import distributed as D
from dissect_ds.data import DataConfig, iter_val, read_classnames, read_templates, validate_spec

# Zero-shot prompts of the val shards, unless zeroshot_classification_templates.txt lies beside them.
TEMPLATES = ("a photo of a {c}.", "a {c}.", "an image of a {c}.")


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
def zeroshot_top1(engine, image: torch.Tensor, labels: torch.Tensor, classnames: list[str], templates) -> float:
    from dissect_ds.evaluation.run import zeroshot_classifier

    logits = image @ zeroshot_classifier(engine, classnames, templates)
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
        templates = read_templates(data) or TEMPLATES
        metrics["eval/zeroshot_top1"] = zeroshot_top1(engine, image, all_labels, classnames, templates)
    return metrics


def wanted(cfg) -> bool:
    """Whether a run config asks for any evaluation (val shards or named sets)."""
    return bool(cfg.data.val or cfg.eval.zeroshot or cfg.eval.retrieval)


def evaluate_run(encoder, data: DataConfig, eval_cfg, rank: int, world_size: int, progress: bool = False) -> dict:
    """The val shards (``eval/i2t_R@1``, ``eval/zeroshot_top1``, ...) when ``data.val`` is
    set, then every named set (``eval/<name>/top1``, ...). ``encoder`` is an
    EngineEncoder or ModelEncoder. Collective; the same dict on every rank."""
    from dissect_ds.evaluation import evaluate_sets

    metrics = evaluate(encoder, data, eval_cfg.batch_size, rank, world_size) if data.val else {}
    metrics.update(evaluate_sets(encoder, eval_cfg, rank, world_size, progress))
    return metrics


# ----------------------------------------------------------------------------- command


def _table(metrics: dict[str, float]) -> str:
    rows = []
    for k, v in metrics.items():
        name, _, metric = k.removeprefix("eval/").rpartition("/")
        rows.append((name or "val", metric, f"{v:.4f}"))
    widths = [max(len(r[i]) for r in [("set", "metric", "value"), *rows]) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [("set", "metric", "value"), *rows])


def _load_model(args, device):
    """(encoder, description) from --model (an export directory) or --run/--checkpoint."""
    from pathlib import Path

    from dissect_ds.evaluation import ModelEncoder

    if args.model:
        import open_clip

        spec = args.model if args.model.startswith("local-dir:") else f"local-dir:{args.model}"
        model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
        return ModelEncoder(model, preprocess, open_clip.get_tokenizer(spec), device), spec
    from dissect_ds.export import load_checkpoint_model

    run = Path(args.run)
    if args.checkpoint is None and (run / "open_clip" / "open_clip_config.json").is_file():
        args.model = str(run / "open_clip")
        return _load_model(args, device)
    model, preprocess, tokenizer, _, path = load_checkpoint_model(run, args.checkpoint)
    return ModelEncoder(model.to(device), preprocess, tokenizer, device), str(path)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    import yaml

    from dissect_ds import config as C
    from dissect_ds.evaluation import EvalConfig

    p = argparse.ArgumentParser(
        prog="python -m dissect_ds.evaluate",
        description="Evaluate a run's checkpoint or an exported model, without training: zero-shot "
        "classification and retrieval on the sets of the `eval` config section (and the val shards of "
        "data.val). Prints a table and writes JSON. One process, or under torchrun/srun/mpirun "
        "(each rank encodes a share).",
        epilog="Examples: python -m dissect_ds.evaluate --run runs/debug  |  python -m dissect_ds.evaluate "
        "--model runs/debug/open_clip eval.zeroshot.mine=/data/x eval.retrieval.coco.images=/data/coco "
        "eval.retrieval.coco.annotations=/data/coco_karpathy_test.json",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        "--run-dir",  # under torchrun: it reads --run as an abbreviation of its own --run-path
        dest="run",
        help="run directory: its config's eval sets and data.val; its final export "
        "(RUN/open_clip) or, with --checkpoint, a DeepSpeed checkpoint. Under torchrun write --run-dir",
    )
    src.add_argument(
        "--model",
        help="an export directory (open_clip_config.json + weights), "
        "e.g. runs/x/open_clip or local-dir:runs/x/open_clip",
    )
    p.add_argument("--checkpoint", help="with --run: checkpoint tag (e.g. step00000020) or 'latest'")
    p.add_argument("--config", help="YAML whose eval section (and data.val) name the sets; replaces the run's")
    p.add_argument("--output", help="JSON file (default: RUN/eval-<source>.json, else ./eval_results.json)")
    p.add_argument("--device", help="cpu or cuda (default: the accelerator if there is one)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides of eval.* and data.val / data.classnames")
    args = p.parse_args(argv)
    if args.checkpoint and not args.run:
        p.error("--checkpoint needs --run")
    rank0 = D.env_from_launcher()["RANK"] == "0"
    try:
        tree: dict = {}
        source = args.config or (f"{args.run}/config.yaml" if args.run else None)
        if source:
            if not Path(source).is_file():
                raise C.ConfigError(f"--config: file not found: {source}")
            full = yaml.safe_load(Path(source).read_text()) or {}
            data = full.get("data") or {}
            tree = {"eval": full.get("eval") or {}, "data": {k: data[k] for k in ("val", "classnames") if data.get(k)}}
        tree = C._merge(tree, C.parse_overrides(args.overrides))
        unknown = set(tree) - {"eval", "data"} or set(tree.get("data", {})) - {"val", "classnames"}
        if unknown:
            raise C.ConfigError(f"unknown key {sorted(unknown)[0]!r}: only eval.* and data.val / data.classnames apply")
        eval_cfg = C._build(EvalConfig, tree.get("eval", {}), "eval.")
        data = DataConfig(**tree.get("data", {}), num_workers=eval_cfg.num_workers)
        err = eval_cfg.validate() or (validate_spec(data.val, name="data.val") if data.val else None)
        if err:
            raise C.ConfigError(err)
        if not (data.val or eval_cfg.zeroshot or eval_cfg.retrieval):
            raise C.ConfigError("nothing to evaluate: set eval.zeroshot.<name>, eval.retrieval.<name> or data.val")
    except C.ConfigError as e:
        if rank0:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    from dissect_ds.engine import device as accelerator
    from dissect_ds.engine import init_distributed

    info = init_distributed() if int(D.env_from_launcher()["WORLD_SIZE"]) > 1 else D.DistInfo()
    device = torch.device(args.device) if args.device else accelerator()
    try:
        encoder, described = _load_model(args, device)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        if rank0:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    metrics = evaluate_run(encoder, data, eval_cfg, info.rank, info.world_size, progress=info.is_main)
    if info.is_main:
        print(f"{described}\n{_table(metrics)}")
        tag = Path(described).name if args.checkpoint else "open_clip"
        out = (
            Path(args.output)
            if args.output
            else Path(args.run) / f"eval-{tag}.json"
            if args.run
            else Path("eval_results.json")
        )
        out.write_text(json.dumps({"model": described, **metrics}, indent=2))
        print(f"wrote {out}")
    if D.is_initialized():
        D.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
