"""The only module that touches DeepSpeed: engine set-up, train step, checkpoints,
the host-resident historical model, and export to an open_clip state dict."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param

from dissect_ds import distributed as D
from dissect_ds.config import Config, build_ds_config
from dissect_ds.loss import contrastive_loss
from dissect_ds.model import Features, ImageNormalize, build_model, split_normalize

NO_DECAY_KEYS = ("bn", "ln", "bias", "logit_scale")


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weights; the message is one line."""


def init_distributed() -> D.DistInfo:
    """Map any launcher's environment to torch's and start the process group.

    gloo on CPU, NCCL on GPUs (via DeepSpeed's accelerator). Under mpirun, ranks agree on
    a master port through mpi4py before the TCP rendezvous.
    """
    pin_jit_builds()
    env = D.env_from_launcher()
    mpi = "MASTER_PORT" not in os.environ and ("OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ)
    os.environ.update(env)
    if mpi:
        os.environ["MASTER_PORT"] = D.mpi_master_port()
    info = D.info_from_env()
    acc = get_accelerator()
    backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
    if info.world_size > 1 or not D.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        if acc.device_name() == "cpu":
            _unlink_shm_buffer(info.rank)
    if acc.device_name() != "cpu":
        acc.set_device(info.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # torchrun sets 1 thread per rank; the deepspeed launcher, srun and mpirun leave torch
        # one thread per core in every rank, and ranks sharing a node then oversubscribe it.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // info.local_world_size))
    return info


def pin_jit_builds() -> None:
    """Build DeepSpeed's JIT-compiled CPU ops (the shared-memory comm op every CPU run
    loads) once per venv, then load them from its cache.

    Two things make the op rebuild (half a minute of g++ on 2 cores, the other ranks waiting
    on its lock): a cache folder shared by several venvs (TORCH_EXTENSIONS_DIR's default,
    ~/.cache/torch_extensions; each venv's build command has its own include paths), and two
    ninja versions taking turns: torch runs the first ``ninja`` on PATH, and a system ninja
    and the one DeepSpeed installs hash the same build command differently, so each takes the
    other's build for stale. Hence the cache defaults to a folder in the venv (a user's
    TORCH_EXTENSIONS_DIR is kept) and DeepSpeed's ninja comes first on PATH.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    import ninja  # a DeepSpeed dependency

    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != ninja.BIN_DIR:
        os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, path) if p)


def _unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer from /dev/shm.

    On CPU, when every rank is on one node (the deepspeed launcher sets LOCAL_SIZE), DeepSpeed
    creates a 66 MiB shared-memory buffer per rank and never unlinks it: each such run would
    leave its buffers in /dev/shm (RAM) until a reboot. Once every rank has mapped every
    buffer (the barrier), the names can go; the mappings live until the ranks exit, even
    on kill -9.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"  # DeepSpeed's shm.cpp naming
    D.barrier()
    Path("/dev/shm", name).unlink(missing_ok=True)


def device() -> torch.device:
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(acc.current_device()))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases and the logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(k in n for k in NO_DECAY_KEYS) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _input_dtype(ds_engine) -> torch.dtype:
    if ds_engine.bfloat16_enabled():
        return torch.bfloat16
    if ds_engine.fp16_enabled():
        return torch.float16
    return torch.float32


def _encode(
    ds_engine, batch, max_logit_scale: float, normalize: ImageNormalize | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = batch.to(device())
    images = normalize(b.images) if normalize else b.images
    out = ds_engine(images.to(_input_dtype(ds_engine)), b.tokens)
    return (
        out["image_features"].float(),
        out["text_features"].float(),
        out["logit_scale"].float().clamp(max=max_logit_scale),
    )


def _pairs(live: torch.nn.Module, frozen: torch.nn.Module):
    return zip(live.parameters(), frozen.parameters(), strict=True)


def host_resident(model: torch.nn.Module, precision_from: dict):
    """A frozen inference engine held in host memory, as DeepSpeed-Chat holds reference
    models: ZeRO-3 parameter offload to CPU and no optimizer, so each rank keeps 1/W of the
    weights in host RAM and only the layer being run is ever gathered onto the accelerator.
    The same code path runs on CPU. Precision (bf16/fp16) as in ``precision_from``, the
    training DeepSpeed config. Collective."""
    model.requires_grad_(False)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False}},
        "steps_per_print": 10**9,
    }
    for key in ("bf16", "fp16"):
        if precision_from.get(key, {}).get("enabled"):
            ds[key] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


class HostSnapshot:
    """A frozen copy of the network, :func:`host_resident`, that follows the live weights
    when refreshed or EMA-updated."""

    def __init__(self, engine: Engine):
        self.live = engine
        model, *_ = build_model(engine.cfg.model.name)
        self.ds = host_resident(model, engine.ds_config)

    def _update(self, fn) -> None:
        """Apply ``fn(frozen_param, live_param)`` parameter by parameter (bounded memory)."""
        live = self.live.ds.module
        for lp, hp in _pairs(live, self.ds.module):
            with deepspeed.zero.GatheredParameters([lp]), deepspeed.zero.GatheredParameters([hp], modifier_rank=0):
                fn(hp.data, lp.data.to(hp.dtype))
        for lb, hb in zip(live.buffers(), self.ds.module.buffers(), strict=True):
            hb.data.copy_(lb.data)

    @torch.no_grad()
    def refresh(self) -> None:
        self._update(lambda h, w: h.copy_(w))

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        self._update(lambda h, w: h.mul_(decay).add_(w, alpha=1 - decay))

    @torch.no_grad()
    def encode(self, batch) -> Features:
        image, text, scale = _encode(self.ds, batch, self.live.cfg.train.max_logit_scale, self.live.normalize)
        return Features(image=image, text=text, logit_scale=float(scale))

    @torch.no_grad()
    def state_dict(self) -> dict:
        """Full weights on rank 0 (``{}`` elsewhere); collective."""
        out = {}
        for name, p in self.ds.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if D.rank() == 0:
                    out[name] = p.data.detach().float().cpu().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """``sd`` as returned by rank 0's :meth:`state_dict`; collective."""
        for name, p in self.ds.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if D.rank() == 0:
                    p.data.copy_(sd[name].to(p.dtype))


class HostReference:
    """The pretrained reference model of the reference-based strategies: loaded once from
    local files (``selection.reference``), :func:`host_resident`, never trained or refreshed.

    It may be another architecture than the learner. When its image transform or tokenizer
    differ from the learner's, ``inputs`` is its (uint8 transform, tokenizer): the data
    workers then add its view of each pair (``Batch.ref_images`` / ``ref_tokens``, made
    from the same decoded image and caption); otherwise it scores the learner's batch.
    """

    def __init__(self, engine: Engine):
        ref = engine.cfg.selection.reference
        model, _, preprocess, tokenizer = build_model(ref.model, ref.pretrained, augment=False)
        transform, self.normalize = split_normalize(preprocess)
        same = repr(preprocess) == repr(engine.preprocess_val) and same_tokenizer(tokenizer, engine.tokenizer)
        self.inputs = None if same else (transform, tokenizer)
        self.image_size = input_side(model)
        self.max_logit_scale = engine.cfg.train.max_logit_scale
        self.ds = host_resident(model, engine.ds_config)

    @torch.no_grad()
    def encode(self, batch) -> Features:
        if self.inputs is not None:
            batch = batch.reference_view()
        image, text, scale = _encode(self.ds, batch, self.max_logit_scale, self.normalize)
        return Features(image=image, text=text, logit_scale=float(scale))


def input_side(model: torch.nn.Module) -> int:
    """A CLIP model's image input side in pixels."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def same_tokenizer(a, b) -> bool:
    """Whether two open_clip tokenizers turn captions into the same tokens (same kind,
    context length and vocabulary, checked on a probe)."""
    probe = ["a small red circle in the top left", "Ünïcode, digits 0123 & punctuation!?"]
    if type(a) is not type(b) or getattr(a, "context_length", None) != getattr(b, "context_length", None):
        return False
    return torch.equal(torch.as_tensor(a(probe)), torch.as_tensor(b(probe)))


class Engine:
    """A DeepSpeed-wrapped open_clip model: scoring forward, train step, checkpoints."""

    def __init__(self, cfg: Config, info: D.DistInfo):
        self.cfg, self.info = cfg, info
        # PyTorch keeps fp32 matrix products in full fp32 by default; open_clip_train turns TF32
        # on for every CUDA run (tensor cores: several times the fp32 rate on Ampere and later).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        model, self.preprocess_train, self.preprocess_val, self.tokenizer = build_model(
            cfg.model.name,
            cfg.model.pretrained,
            grad_checkpointing=cfg.model.grad_checkpointing,
            patch_dropout=cfg.model.patch_dropout,
            augment=cfg.data.augment,
        )
        # The train stream ships uint8 images; they are scaled and normalised on the device.
        self.preprocess_train, self.normalize = split_normalize(self.preprocess_train)
        self.image_size = input_side(model)
        self.ds_config = build_ds_config(cfg, info.world_size)
        schedule = lr_lambda(cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio)
        self.ds, *_ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.train.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.manual_clip = cfg.train.grad_clip > 0 and self.ds_config["gradient_clipping"] == 0

    @torch.no_grad()
    def encode(self, batch) -> Features:
        """Scoring forward of the current model: no gradient, inference mode (dropout
        off, BatchNorm statistics frozen), same precision as training. Collective under
        ZeRO-3: every rank must call it."""
        self.ds.eval()
        try:
            image, text, scale = _encode(self.ds, batch, self.cfg.train.max_logit_scale, self.normalize)
        finally:
            self.ds.train()
        return Features(image=image, text=text, logit_scale=float(scale))

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n, D]`` normalised text features (a root-module forward, so ZeRO-3 gathers
        the root's own parameters too)."""
        self.ds.eval()
        try:
            return self.ds(None, tokens.to(device()))["text_features"].float()
        finally:
            self.ds.train()

    def train_step(self, batch, fallback, sizes: list[int]) -> dict[str, float]:
        """Forward/backward on this rank's selected rows ``batch`` (may be empty) and an
        optimizer step at the accumulation boundary. Returns global loss, lr, grad norm.

        A rank with no selected rows still runs forward/backward on one row of
        ``fallback`` with zero weight: ZeRO's gradient reduction and ZeRO-3's parameter
        gathering are collectives that every rank must join. ``sizes``: every rank's row
        count (the selection knows it without a collective).
        """
        n = len(batch)
        assert sizes[self.info.rank] == n, f"train_step: {n} rows but sizes[{self.info.rank}] = {sizes[self.info.rank]}"
        image, text, scale = _encode(
            self.ds, batch if n else fallback.select(torch.arange(1)), self.cfg.train.max_logit_scale, self.normalize
        )
        loss_bw, loss = contrastive_loss(image[:n], text[:n], scale, sizes, self.info.rank)
        # ``loss`` is global (identical on every rank), so every rank stops here together, before
        # a non-finite gradient reaches the weights.
        if not torch.isfinite(loss):
            raise Diverged(f"loss is {float(loss)}")
        if n == 0:
            loss_bw = loss_bw + 0.0 * (image.sum() + text.sum())
        self.ds.backward(loss_bw)
        if self.manual_clip and self.ds.is_gradient_accumulation_boundary():
            torch.nn.utils.clip_grad_norm_(self.ds.module.parameters(), self.cfg.train.grad_clip)
        # DeepSpeed 0.18.9 + torch 2.14 on CPU: ZeRO 1/2 step modifies a view in place
        # unless autograd is off (see docs/design.md).
        with torch.no_grad():
            self.ds.step()
        return {"loss": float(loss), "lr": float(self.ds.get_lr()[0]), "logit_scale": float(scale.detach())}

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def check_finite_step(self, grad_norm: float | None) -> None:
        """Raise :class:`Diverged` when the last optimizer step applied a non-finite gradient.
        Under fp16, DeepSpeed's dynamic loss scaler skips overflowing steps on its own (the
        weights are untouched), so only fp32/bf16 steps count; the norm is global."""
        if grad_norm is not None and not math.isfinite(grad_norm) and not self.ds.fp16_enabled():
            raise Diverged(f"gradient norm is {grad_norm}")

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Collective: True when every rank's (partition of the) weights is finite."""
        ok = True
        for p in self.ds.module.parameters():
            local = getattr(p, "ds_tensor", None)  # ZeRO-3 keeps this rank's partition in ds_tensor ...
            if local is None:
                local = p
            else:  # ... padded at the end to a common size, padding that DeepSpeed never writes
                start = local.numel() * deepspeed.comm.get_rank(group=p.ds_process_group)
                local = local[: max(0, min(local.numel(), p.ds_numel - start))]
            if local.numel() and not torch.isfinite(local).all():
                ok = False
                break
        return D.all_ok(ok)

    def historical_model(self) -> HostSnapshot:
        return HostSnapshot(self)

    def reference_model(self) -> HostReference:
        """The pretrained reference model (collective): ``selection.reference``."""
        return HostReference(self)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, root: Path, tag: str) -> None:
        """DeepSpeed's own files for ``root/tag`` (collective); refuses non-finite weights."""
        if not self.weights_finite():
            raise Diverged("the weights hold NaN/inf")
        self.ds.save_checkpoint(str(root), tag=tag, save_latest=False)

    def load_checkpoint(self, root: Path, tag: str) -> None:
        self.ds.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)

    def export_open_clip(self, path: Path, directory: Path | None = None) -> None:
        """Write fp32 weights loadable by ``open_clip.create_model(name, pretrained=path)``
        and, with ``directory``, a self-describing export that plain open_clip and
        clip_benchmark load as ``local-dir:<directory>`` (see dissect_ds/export.py).
        Collective (ZeRO-3 gathers each parameter)."""
        if not self.weights_finite():
            raise Diverged("the weights hold NaN/inf")
        params = dict(self.ds.module.named_parameters())
        # Under bf16/fp16 the module holds rounded copies; the fp32 master weights live in the
        # optimizer (what a checkpoint's zero_to_fp32 consolidation reads too).
        low = _input_dtype(self.ds) != torch.float32
        state = {}
        for name, value in self.ds.module.state_dict().items():
            p = params.get(name)
            master = safe_get_full_fp32_param(p) if low and p is not None and p.requires_grad else None
            if master is not None:
                state[name] = master.detach().float().cpu().clone()
                continue
            with deepspeed.zero.GatheredParameters([p] if p is not None else []):
                state[name] = (p.data if p is not None else value).detach().float().cpu().clone()
        if self.info.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
            if directory is not None:
                from dissect_ds.export import write_open_clip_dir

                write_open_clip_dir(state, self.ds.module, self.cfg.model.name, directory)
        D.barrier()


def checkpoint_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights of a checkpoint directory written by :meth:`Engine.save`
    (``root/tag``), any ZeRO stage and world size, in one process without a process group.

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer files; DeepSpeed's
    zero_to_fp32 merges them. ZeRO-0 (no partitioned files) stores the module whole.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(path.glob("*zero_pp_rank_*optim_states.pt")):
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
            return {k: v.float() for k, v in state.items()}
        except (ValueError, KeyError):  # bf16 ZeRO-0 optimizer files are not ZeRO partitions
            pass
    state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}
