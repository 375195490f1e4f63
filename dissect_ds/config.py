"""Run configuration: typed sections, YAML + ``key=value`` overrides, one-line errors.

Each component owns its section dataclass (``DataConfig`` in data/, ``SelectionConfig``
in selection/); this module assembles them into :class:`Config`, coerces and checks
types, validates ranges and cross-field constraints, and dumps the resolved config.
Every problem is reported as one line naming the key and what is allowed, before any
process group exists (see :func:`load_or_exit`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dissect_ds.data import DataConfig
from dissect_ds.evaluation.config import EvalConfig
from dissect_ds.selection import SelectionConfig
from dissect_ds.selection import validate as validate_selection
from dissect_ds.selection.selector import kept_count

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = "dissect-tiny-vit"  # an open_clip zoo name or one of dissect_ds/model_configs
    pretrained: str | None = None  # local checkpoint path (never downloaded)
    grad_checkpointing: bool = False  # recompute transformer blocks in backward: less memory, same losses
    patch_dropout: float = 0.0  # ViT: drop this share of image patches when training (FLIP); never when scoring


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 64  # global, before selection
    lr: float = 5e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1
    max_logit_scale: float = 100.0
    tf32: bool = True  # fp32 matrix products in TF32 on NVIDIA GPUs (Ampere and later); no effect on CPU


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"
    zero_stage: int | None = None  # overrides the file
    bf16: bool | None = None  # overrides the file
    fp16: bool | None = None  # overrides the file
    offload_optimizer: bool | None = None  # overrides the file (CPU optimizer offload)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only the final checkpoint
    keep: int = 2
    allow_config_change: bool = False  # resume even if model batch size / selection changed since the checkpoint


@dataclass
class LogConfig:
    every_steps: int = 10  # human-readable line; metrics.jsonl gets every step
    progress: bool = True
    tensorboard: bool = True
    histograms_every_steps: int = 50


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resume: str | None = None  # "latest", a checkpoint directory, or empty

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ---------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Return ``value`` as type ``tp`` or raise ConfigError (no silent str->int etc.)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict:  # free-form mappings (e.g. eval.zeroshot); their owner validates them
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in known:
            raise ConfigError(f"unknown key '{key}' (allowed: {', '.join(known)})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {v!r}")
            kwargs[k] = _build(tp, v, f"{key}.")
        else:
            kwargs[k] = _coerce(key, v, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=1e-3)")
        k, v = item.split("=", 1)
        parsed = yaml.safe_load(v) if v != "" else None
        _set_dotted(tree, k.strip(), parsed)
    return tree


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and out.get(k) is not None and not isinstance(out[k], dict):
            # e.g. `run: 5` in the file: an override of run.name must not silently replace it
            raise ConfigError(f"{prefix}{k}: expected a section (mapping), got {out[k]!r}")
        out[k] = _merge(out[k], v, f"{prefix}{k}.") if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | None, overrides: list[str] | None = None, world_size: int | None = None) -> Config:
    """Build a validated Config from a YAML file and ``key=value`` overrides (validated for
    ``world_size`` ranks when given)."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections")
    tree = _merge(tree, parse_overrides(overrides or []))
    cfg = _build(Config, tree, "")
    validate(cfg, world_size)
    return cfg


# ------------------------------------------------------------------------- validation


def resolve_path(p: str) -> Path:
    """Paths in configs are relative to the working directory, else to the repo root."""
    path = Path(p)
    if path.is_absolute() or path.exists():
        return path
    return PACKAGE_ROOT / p


def load_ds_json(cfg: Config) -> dict:
    p = resolve_path(cfg.deepspeed.config)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config: file not found: {cfg.deepspeed.config} (see ds_configs/)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {p} is not valid JSON ({e})") from None


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Range and cross-field checks; raises ConfigError with a one-line message."""
    from dissect_ds.model import model_exists

    t = cfg.train
    checks: list[tuple[bool, str]] = [
        (cfg.run.name != "" and "/" not in cfg.run.name, "run.name: must be a non-empty name without '/'"),
        (
            0.0 <= cfg.model.patch_dropout < 1.0,
            f"model.patch_dropout: must be in [0, 1), got {cfg.model.patch_dropout}",
        ),
        (t.steps > 0, f"train.steps: must be > 0, got {t.steps}"),
        (t.batch_size > 0, f"train.batch_size: must be > 0, got {t.batch_size}"),
        (t.lr > 0, f"train.lr: must be > 0, got {t.lr}"),
        (t.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {t.warmup_steps}"),
        (0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}"),
        (t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}"),
        (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2: must be in [0, 1)"),
        (t.eps > 0, f"train.eps: must be > 0, got {t.eps}"),
        (t.grad_clip >= 0, f"train.grad_clip: must be >= 0 (0 disables), got {t.grad_clip}"),
        (t.grad_accum >= 1, f"train.grad_accum: must be >= 1, got {t.grad_accum}"),
        (t.max_logit_scale > 0, f"train.max_logit_scale: must be > 0, got {t.max_logit_scale}"),
        (
            t.batch_size % t.grad_accum == 0,
            f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})",
        ),
        (cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps: must be >= 0 (0 = final only)"),
        (cfg.checkpoint.keep >= 1, f"checkpoint.keep: must be >= 1, got {cfg.checkpoint.keep}"),
        (cfg.log.every_steps > 0, f"log.every_steps: must be > 0, got {cfg.log.every_steps}"),
        (
            cfg.deepspeed.zero_stage is None or cfg.deepspeed.zero_stage in (0, 1, 2, 3),
            f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if world_size is not None and t.batch_size % (world_size * t.grad_accum) != 0:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by world size x grad_accum "
            f"({world_size} x {t.grad_accum})"
        )
    if cfg.selection.strategy != "none" and t.grad_accum > 1:
        per_rank = cfg.selection.scope == "local" and world_size is not None
        kept = (
            world_size * kept_count(cfg.selection.rate, t.batch_size // world_size)
            if per_rank
            else kept_count(cfg.selection.rate, t.batch_size)
        )
        if kept < t.grad_accum:
            raise ConfigError(
                f"selection.rate: {cfg.selection.rate} keeps {kept} pairs of each step, fewer than its "
                f"train.grad_accum ({t.grad_accum}) micro-batches; raise the rate or lower grad_accum"
            )
    sel, k = cfg.selection, kept_count(cfg.selection.rate, t.batch_size)
    if sel.strategy == "jest" and k % max(1, sel.jest_chunks):
        raise ConfigError(
            f"selection.jest_chunks: {sel.jest_chunks} does not divide the {k} pairs kept of each batch of "
            f"{t.batch_size} (selection.rate {sel.rate})"
        )
    if not model_exists(cfg.model.name):
        raise ConfigError(f"model.name: unknown model '{cfg.model.name}' (see `python -m dissect_ds.model --list`)")
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise ConfigError(f"model.pretrained: file not found: {cfg.model.pretrained} (weights are never downloaded)")
    _check_output_dir(cfg)
    errors = validate_selection(cfg.selection)
    if errors:
        raise ConfigError(errors[0])
    err = cfg.data.validate()
    if err:
        raise ConfigError(err)
    err = cfg.eval.validate()
    if err:
        raise ConfigError(err)
    ds = build_ds_config(cfg, world_size or 1)
    stage = ds["zero_optimization"]["stage"]
    if stage not in (0, 1, 2, 3):  # from the file: an override was checked above
        raise ConfigError(f"{cfg.deepspeed.config}: zero_optimization.stage must be 0-3, got {stage}")
    bf16, fp16 = (bool(ds.get(k, {}).get("enabled")) for k in ("bf16", "fp16"))
    if bf16 and fp16:
        raise ConfigError("deepspeed.bf16 and deepspeed.fp16: enable at most one precision")
    if fp16 and not _has_gpu():
        raise ConfigError(
            "deepspeed.fp16: needs a GPU (DeepSpeed's CPU accelerator has no fp16); use deepspeed.bf16=true"
        )
    from dissect_ds import checkpoint

    checkpoint.validate(cfg, world_size, stage)


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON from ``deepspeed.config`` with the run's overrides applied: the one
    place the effective ZeRO stage and precision are decided (validation reads them here too)."""
    ds = load_ds_json(cfg)
    t = cfg.train
    ds["train_batch_size"] = t.batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_micro_batch_size_per_gpu"] = t.batch_size // (world_size * t.grad_accum)
    ds["gradient_clipping"] = t.grad_clip
    ds["steps_per_print"] = 10**9
    ds.setdefault("wall_clock_breakdown", False)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    if cfg.deepspeed.offload_optimizer is not None:
        if cfg.deepspeed.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        else:
            zero.pop("offload_optimizer", None)
    for key in ("bf16", "fp16"):
        value = getattr(cfg.deepspeed, key)
        if value is not None:
            ds.setdefault(key, {})["enabled"] = value
    if zero["stage"] == 0 and not any(ds.get(k, {}).get("enabled") for k in ("bf16", "fp16")):
        # DeepSpeed 0.18.9's fp32 ZeRO-0 clipping multiplies every grad by a [1]-shaped
        # coefficient in place, which fails on open_clip's 0-dim logit_scale: clip in Engine.
        ds["gradient_clipping"] = 0.0
    offload = "offload_optimizer" in zero and zero["offload_optimizer"].get("device", "none") != "none"
    params = {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay}
    # torch's AdamW needs no JIT-compiled op (FusedAdam); its fused kernel (CPU and CUDA) is one
    # pass over each tensor instead of a dozen elementwise ops. The offloaded optimizer runs
    # DeepSpeedCPUAdam.
    torch_adam = {**params, "torch_adam": True, "fused": True}
    ds["optimizer"] = {"type": "AdamW", "params": params if offload else torch_adam}
    if offload:
        ds["zero_force_ds_cpu_optimizer"] = True
    return ds


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_output_dir(cfg: Config) -> None:
    """The run directory can be created and written (checked up to its nearest existing parent)."""
    p = cfg.run_dir.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"run.output_dir: {p} is a file, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir: {p} is not writable")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def load_or_exit(path: str | None, overrides: list[str], world_size: int | None = None) -> Config:
    """Load and validate, or print one line and exit 2 (only rank 0 prints)."""
    try:
        return load(path, overrides, world_size)
    except ConfigError as e:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
