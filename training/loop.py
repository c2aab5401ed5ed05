"""The training loop: Adam with LR warm-up, EMA, DDP, resume, snapshots.

A run folder holds:
    model.safetensors   EMA weights + config (what export and sampling load)
    train-state.pt      model, EMA and optimizer state for --resume (tensors only: weights_only=True)
    samples.png         latest sample grid, one row per class
    log.jsonl           one line of metrics per tick
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lego_export.atomic import atomic_write, check_output, folder_lock
from lego_export.checkpoint import save_checkpoint
from lego_export.config import LegoConfig, get_preset
from lego_export.errors import LegoError
from lego_export.images import make_grid, save_image
from lego_export.model import LegoModel
from lego_export.preview import class_grid_labels, sample_images
from lego_export.tiling import canvas_coords
from lego_train.crops import CanvasWindows
from lego_train.data import load_dataset, to_model_range
from lego_train.loss import edm_loss

STATE_FILE = "train-state.pt"
CHECKPOINT_FILE = "model.safetensors"


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "pg-s"
    batch: int = 64  # global batch, split across processes
    kimg: float = 1000.0  # training duration in thousands of images
    lr: float = 5e-4
    warmup_kimg: float = 10.0
    lr_decay: str | None = None  # none, linear or cosine; None: what the resumed run used (none for a new run)
    decay_kimg: float | None = None  # decay over the last this many kimg before --kimg; None: all of this run
    lr_final: float | None = None  # the decay ends at this fraction of --lr; None: 0
    ema_halflife_kimg: float = 20.0
    ema_rampup: float = 0.05  # EMA half-life at most this fraction of images seen so far
    canvas_windows: float = 0.5  # fraction of each batch cut from larger virtual canvases (crops.py)
    canvas_max_tiles: int = 4  # those canvases are up to this many training images high and wide
    cond: bool = True
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    snapshot_kimg: float = 25.0
    tick_kimg: float = 2.0
    grid_steps: int = 18
    resume: str | None = None
    preset_given: bool = False  # --preset was on the command line (a resume refuses another preset)


class Distributed:
    """Rank and world size from torchrun's environment; a no-op in a single process."""

    def __init__(self, device_kind: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LegoError("--device cuda asked for, but PyTorch sees no CUDA GPU")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise LegoError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


@torch.no_grad()
def update_ema(ema: LegoModel, model: LegoModel, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1 - beta)


DECAYS = ("none", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up from 0, then a constant rate, then an optional decay to a fraction of it.

    Positions are absolute image counts, so a resumed run (which stores this in its train-state)
    continues the same curve whatever --kimg it is resumed with.
    """

    lr: float
    warmup_nimg: float
    decay: str = "none"
    decay_start: float = 0.0
    decay_end: float = 0.0
    final: float = 0.0

    def __call__(self, nimg: float) -> float:
        warm = min(1.0, nimg / max(self.warmup_nimg, 1.0))
        if self.decay == "none" or nimg <= self.decay_start:
            return self.lr * warm
        t = min(1.0, (nimg - self.decay_start) / max(self.decay_end - self.decay_start, 1.0))
        shape = 1 - t if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * t))
        return self.lr * warm * (self.final + (1 - self.final) * shape)


def lr_schedule(cfg: TrainConfig, nimg: int, stored: object) -> LRSchedule:
    """The run's schedule. --lr and --warm-up come from the command line as before; the decay is the
    resumed run's own unless --lr-decay is given, which starts a new decay where this run starts."""
    if cfg.lr_decay is None and stored is not None:
        fields = ("decay", "decay_start", "decay_end", "final")
        if not isinstance(stored, dict) or not set(fields) <= set(stored):
            raise LegoError("the train-state's lr_schedule is damaged (missing fields)")
        decay, start, end, final = (stored[f] for f in fields)
        numbers = (start, end, final)
        if decay not in DECAYS or not all(isinstance(v, int | float) and math.isfinite(v) for v in numbers):
            raise LegoError("the train-state's lr_schedule is damaged (bad values)")
        if not (0 <= final <= 1 and 0 <= start <= end):
            raise LegoError("the train-state's lr_schedule is damaged (values out of range)")
        return LRSchedule(cfg.lr, cfg.warmup_kimg * 1000, decay, float(start), float(end), float(final))
    end = cfg.kimg * 1000
    start = nimg if cfg.decay_kimg is None else max(nimg, end - cfg.decay_kimg * 1000)
    final = 0.0 if cfg.lr_final is None else cfg.lr_final
    return LRSchedule(cfg.lr, cfg.warmup_kimg * 1000, cfg.lr_decay or "none", start, end, final)


def find_state(resume: str) -> Path:
    path = Path(resume)
    path = path / STATE_FILE if path.is_dir() else path
    if not path.is_file():
        raise LegoError(f"nothing to resume: {path} not found")
    return path


def train(cfg: TrainConfig) -> Path:
    """Train a LEGO model; returns the path of the EMA checkpoint."""
    check_output(cfg.out, "--out", folder=True)  # before the lock, which is made inside it
    device_kind = resolve_device(cfg.device, 0).type
    ddp = Distributed(device_kind)
    try:
        # One run per folder: the main process holds its lock while the run writes there.
        with folder_lock(cfg.out, "lego-train") if ddp.main else contextlib.nullcontext():
            return _train(cfg, ddp, resolve_device(cfg.device, ddp.local_rank))
    finally:
        ddp.close()


def check_options(cfg: TrainConfig) -> None:
    """Every numeric option in range before any data is read or memory allocated."""
    for name, value, lo, hi in (
        ("--batch", cfg.batch, 1, 1 << 16),
        ("--seed", cfg.seed, 0, 2**31 - 1),
        ("--canvas-max-tiles", cfg.canvas_max_tiles, 1, 64),
    ):
        if not lo <= value <= hi:
            raise LegoError(f"{name} must be from {lo} to {hi}, got {value}")
    for name, amount in (
        ("--kimg", cfg.kimg),
        ("--lr", cfg.lr),
        ("--snapshot-kimg", cfg.snapshot_kimg),
        ("--ema", cfg.ema_halflife_kimg),
    ):
        if not (math.isfinite(amount) and amount > 0):
            raise LegoError(f"{name} must be a positive number, got {amount}")
    if not (math.isfinite(cfg.warmup_kimg) and cfg.warmup_kimg >= 0):
        raise LegoError(f"--warmup-kimg must be zero or positive, got {cfg.warmup_kimg}")
    if not 0 <= cfg.canvas_windows <= 1:
        raise LegoError(f"--canvas-windows must be in [0, 1], got {cfg.canvas_windows}")
    if cfg.lr_decay is not None and cfg.lr_decay not in DECAYS:
        raise LegoError(f"--lr-decay must be one of {', '.join(DECAYS)}, got {cfg.lr_decay!r}")
    for name, optional in (("--decay-kimg", cfg.decay_kimg), ("--lr-final", cfg.lr_final)):
        if optional is not None and cfg.lr_decay in (None, "none"):
            raise LegoError(f"{name} needs --lr-decay linear or cosine")
    if cfg.lr_final is not None and not (math.isfinite(cfg.lr_final) and 0 <= cfg.lr_final <= 1):
        raise LegoError(f"--lr-final must be in [0, 1], got {cfg.lr_final}")
    if cfg.decay_kimg is not None and not (math.isfinite(cfg.decay_kimg) and cfg.decay_kimg > 0):
        raise LegoError(f"--decay-kimg must be a positive number, got {cfg.decay_kimg}")


def load_state(path: Path) -> dict:
    """The resumable state, loaded without running code (weights_only); one line if it is damaged."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LegoError(f"{path} is not a readable training state ({first[:160]})") from None
    if not isinstance(state, dict) or not {"model", "ema", "optimizer", "nimg", "config"} <= set(state):
        raise LegoError(f"{path} is not a lego-train state (missing fields)")
    nimg = state["nimg"]
    if isinstance(nimg, bool) or not isinstance(nimg, int) or nimg < 0:
        raise LegoError(f"{path}: nimg must be a count of images, got {nimg!r}")
    return state


def _train(cfg: TrainConfig, ddp: Distributed, device: torch.device) -> Path:
    out = Path(cfg.out)
    check_options(cfg)
    check_output(out, "--out", folder=True)
    if cfg.batch % ddp.world:
        raise LegoError(f"--batch {cfg.batch} does not split evenly over {ddp.world} processes")
    if cfg.resume is None and (out / STATE_FILE).exists():
        raise LegoError(f"{out} already holds a run; pass --resume {out} to continue it, or choose another --out")

    data = load_dataset(cfg.data)
    if len(data.images) < cfg.batch:
        raise LegoError(f"--batch {cfg.batch} is more than the {len(data.images)} images in --data; lower --batch")
    height, width = data.resolution
    if height != width:
        raise LegoError(f"training images must be square for now, got {height}x{width}")
    num_classes = data.num_classes if cfg.cond else 0
    if cfg.cond and not num_classes:
        raise LegoError(f"{cfg.data} has no labels; train with --no-cond")

    state = None
    if cfg.resume is not None:
        state = load_state(find_state(cfg.resume))
        model_cfg = LegoConfig.from_json(state["config"])
        if cfg.preset_given and get_preset(cfg.preset).name != model_cfg.name:
            raise LegoError(
                f"--preset {cfg.preset}: the run being resumed is a {model_cfg.name} model; leave --preset out "
                "to continue it, or start a new run in another --out"
            )
        found = (data.images.shape[1], height, num_classes)
        expected = (model_cfg.img_channels, model_cfg.img_resolution, model_cfg.num_classes)
        if found != expected:
            raise LegoError(
                f"--data gives (channels, resolution, classes) = {found} but the run being resumed was trained "
                f"on {expected}"
            )
    else:
        model_cfg = get_preset(
            cfg.preset, img_channels=data.images.shape[1], img_resolution=height, num_classes=num_classes
        )

    if state is not None and int(state["nimg"]) >= cfg.kimg * 1000:
        raise LegoError(
            f"the run already has {int(state['nimg']) / 1000:g} kimg; nothing to train: raise --kimg above that"
        )
    torch.manual_seed(cfg.seed * 1000 + ddp.rank + (state["nimg"] if state else 0))
    model = LegoModel(model_cfg).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    nimg = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise LegoError(f"{cfg.resume}: the training state does not fit its own model config ({first})") from None
        nimg = int(state["nimg"])
        if ddp.main:
            trim_log(out / "log.jsonl", nimg / 1000)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
    schedule = lr_schedule(cfg, nimg, state.get("lr_schedule") if state is not None else None)
    if ddp.main and cfg.resume is None and cfg.kimg < cfg.warmup_kimg:
        tqdm.write(f"note: --kimg {cfg.kimg:g} ends inside the {cfg.warmup_kimg:g} kimg warm-up; lower --warmup-kimg")
    if ddp.main and schedule.decay != "none":
        tqdm.write(
            f"learning rate: {schedule.decay} decay from {schedule.decay_start / 1000:g} to "
            f"{schedule.decay_end / 1000:g} kimg, down to {schedule.final:g} x {schedule.lr:g}"
        )

    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels) if num_classes else None
    rng = np.random.default_rng([cfg.seed, nimg])  # same on every rank: ranks slice one global batch
    order, cursor = rng.permutation(len(images)), 0
    local_batch = cfg.batch // ddp.world
    windows = CanvasWindows(images, labels, cfg.canvas_max_tiles)
    window_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + nimg * 7 + ddp.rank)
    full_coords = torch.from_numpy(canvas_coords(height, width)).expand(local_batch, 2, height, width)
    total = int(cfg.kimg * 1000)

    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        param_count = model.num_parameters()
        tqdm.write(
            f"{model_cfg.name}: {param_count / 1e6:.2f}M parameters, {len(images)} images "
            f"{height}x{width}x{data.images.shape[1]}, {num_classes} classes, {ddp.world} process(es) on {device}"
        )
    bar = tqdm(
        total=total,
        initial=min(nimg, total),
        unit="img",
        unit_scale=True,
        disable=not ddp.main,
        dynamic_ncols=True,
        smoothing=0.05,
    )
    tick_start, tick_nimg, tick_losses = time.perf_counter(), nimg, []
    next_tick = nimg + cfg.tick_kimg * 1000
    next_snapshot = nimg + cfg.snapshot_kimg * 1000
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")

    while nimg < total:
        if cursor + cfg.batch > len(order):
            order, cursor = rng.permutation(len(images)), 0
        idx = order[cursor + ddp.rank * local_batch : cursor + (ddp.rank + 1) * local_batch]
        cursor += cfg.batch
        pixels, coords = images[idx], full_coords.clone()
        windowed = torch.nonzero(torch.rand(local_batch, generator=window_rng) < cfg.canvas_windows).flatten()
        if len(windowed):
            pixels[windowed], coords[windowed] = windows(torch.from_numpy(idx)[windowed], window_rng)
        x, coords = to_model_range(pixels.to(device).float()), coords.to(device)
        onehot = None
        if labels is not None:
            onehot = torch.nn.functional.one_hot(labels[idx], num_classes).float().to(device)
            keep = torch.rand(local_batch, 1, device=device) >= model_cfg.label_dropout
            onehot = onehot * keep  # an all-zero row is the null label (for classifier-free guidance)

        for group in optimizer.param_groups:
            group["lr"] = schedule(nimg + cfg.batch)
        with autocast:
            loss, per_brick = edm_loss(net, x, onehot, coords)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        nimg += cfg.batch

        ema_nimg = min(cfg.ema_halflife_kimg * 1000, nimg * cfg.ema_rampup)
        update_ema(ema, model, 0.5 ** (cfg.batch / max(ema_nimg, 1e-8)))
        tick_losses.append(per_brick.cpu())
        bar.update(cfg.batch)

        if nimg >= next_tick or nimg >= total:
            brick_losses = torch.stack(tick_losses).mean(0)
            if ddp.world > 1:
                dist.all_reduce(brick_losses)
                brick_losses /= ddp.world
            seconds = time.perf_counter() - tick_start
            record = {
                "kimg": round(nimg / 1000, 3),
                "loss": round(brick_losses.mean().item(), 5),
                "brick_losses": [round(v, 5) for v in brick_losses.tolist()],
                "img_per_s": round((nimg - tick_nimg) / seconds, 2),
                "lr": optimizer.param_groups[0]["lr"],
                "time": time.time(),
            }
            if not math.isfinite(record["loss"]):
                raise LegoError(f"loss became {record['loss']} at {record['kimg']} kimg; lower --lr and --resume")
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if ddp.main:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            tick_start, tick_nimg, tick_losses = time.perf_counter(), nimg, []
            next_tick += cfg.tick_kimg * 1000

        if nimg >= next_snapshot or nimg >= total:
            if ddp.main:
                snapshot(out, model, ema, optimizer, nimg, cfg, data.class_names, schedule)
                tqdm.write(f"snapshot at {nimg / 1000:.1f} kimg -> {out}")
            ddp.barrier()
            next_snapshot += cfg.snapshot_kimg * 1000
    bar.close()
    return out / CHECKPOINT_FILE


def trim_log(path: Path, kimg: float) -> None:
    """Drop the log lines past kimg: a run stopped between snapshots resumes from its last snapshot
    and would otherwise log those images twice."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["kimg"] <= kimg))


def snapshot(
    out: Path,
    model: LegoModel,
    ema: LegoModel,
    optimizer,
    nimg: int,
    cfg: TrainConfig,
    class_names: list[str],
    schedule: LRSchedule,
) -> None:
    """Write the EMA checkpoint, the resumable state and a sample grid, each atomically."""
    extra = {"kimg": nimg / 1000, "data": cfg.data, "class_names": class_names, "train": asdict(cfg)}
    save_checkpoint(out / CHECKPOINT_FILE, ema, extra=extra)
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "nimg": nimg,
        "config": model.cfg.to_json(),
        "lr_schedule": asdict(schedule),
    }
    with atomic_write(out / STATE_FILE) as f:
        torch.save(state, f)

    per_class = 8
    classes = ema.cfg.num_classes
    labels = class_grid_labels(classes, per_class) if classes else None
    num = classes * per_class if classes else per_class * per_class
    device = next(ema.parameters()).device
    samples = sample_images(ema, labels, num, steps=cfg.grid_steps, seed=0, device=device)
    save_image(make_grid(samples, columns=per_class), out / "samples.png")
