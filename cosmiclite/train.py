"""Daring training (CosmicMan, Sec. 4.3, Eq. 4): L = α·L_noise + β·L_HOLA, one loop on accelerate.

One YAML config drives every run the kit makes:

    stage: vae    the toy model's autoencoder, from scratch (MSE + kl_weight·KL), for a from-scratch base model;
    stage: unet   the denoiser: from scratch (the toy base model: noise loss only, β = 0, full training),
                  LoRA on the UNet attention projections (peft), or a full fine-tune, with HOLA (Eq. 3) when β > 0.

The UNet step, for a batch of images x with captions c (input_ids), group spans [s_i, e_i) and masks h_i:

    z_0 = E(x) · scaling,  ε ~ N(0, I),  t ~ p(t),  z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε                      (Eq. 1)
    L_noise = ‖ε − ε_θ(z_t, t, τ(c))‖²   (or the v-target when the scheduler predicts v)
    L_HOLA  = Eq. 3 on the cross-attention maps captured in that same forward (cosmiclite.attention)
    L       = α·L_noise + β·L_HOLA                                                                  (Eq. 4)

Captions are augmented as CosmicMan trains: the body group (which holds the shot phrase) first, the other
groups shuffled, each dropped with a small probability (spans and masks follow the text), and the caption
emptied for 10 % of samples (unconditional dropout, so classifier-free guidance works).

Exact resume: the data of step k (which samples, their caption augmentation, the noise and timesteps) is a
pure function of (seed, k, process index), so a run restarted from the checkpoint of step k replays steps
k+1 … exactly; the trainable weights, optimizer, LR scheduler and the torch/numpy/python RNG states are
saved by `accelerate.save_state`. Checkpoints are written atomically: into a temporary folder, fsync'ed,
a COMPLETE marker written last, then renamed; a folder without the marker is never loaded.

Scaling out (issue 7): the same loop runs unchanged under `accelerate launch` / `torchrun -m cosmiclite.train`
with DDP, DeepSpeed ZeRO-2 or FSDP (configs/accelerate/). The global batch is

    global batch = run.batch_size (per process) × processes × run.grad_accum,

and `optim.scale_lr: true` multiplies optim.lr by it (linear scaling rule). Process r of W takes the samples of
global positions k·B·W + r·B + i, and every per-sample draw is keyed by that position, so W processes × batch B
see exactly the samples, noise and timesteps of 1 process × batch W·B (tests/test_distributed.py checks the loss
curve and the weights). The data-parallel mean is exact for HOLA too: a process's HOLA mean over its kept samples
is re-weighted by its share of the kept samples of the whole global batch (see `_hola_dp_weight`). Gradient
accumulation, no_sync and DeepSpeed's own accumulation come from `accelerator.accumulate`; the LR schedule
counts optimizer steps (`step_scheduler_with_optimizer=False`), so a checkpoint resumes under any process count.
Logged losses are averaged over the processes; log.csv, validation images and outputs are written by the main
process only. Checkpoints: every rank writes its part (DeepSpeed/FSDP optimizer shards, RNG states) into the
temporary folder; after a barrier only the main process fsyncs, marks and renames it (multi-node runs need the
output folder on a shared file system). EMA of the UNet (`ema:`, diffusers' EMAModel, fp32 shadow weights) is
saved with every checkpoint as safetensors and resumed.

HOLA under wrapping: the capture processors and the pre-forward hook are installed on the unwrapped UNet (the
module inside DDP / the DeepSpeed engine / the root FSDP unit). DDP and DeepSpeed call that module's forward, so
every attention layer records as in one process (tested under DDP). FSDP (use_orig_params) keeps the module tree
and its plain-Python processor objects; each wrapped BasicTransformerBlock gathers its weights before its forward,
so the processor computes M on full weights and the maps stay in the autograd graph, whose backward runs through
FSDP's gradient reduce-scatter like any activation.

But: no SNR weighting, no aspect-ratio buckets; validation renders images only (the notebooks draw the attention
maps). Under FSDP there is no EMA (the shadow weights would be shards) and validation is skipped (sharded weights
cannot be sampled on one process: sample from OUTPUT/pipeline). LoRA runs are meant for one GPU or DDP; DeepSpeed
saves the UNet in its training dtype (bf16 under bf16; the fp32 master weights stay in the checkpoint).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .hola import HolaConfig, hola_terms
from .scaling import GiB, global_batch

__all__ = ["TrainConfig", "ConfigError", "load_config", "train", "export_lora", "save_lora", "latest_checkpoint",
           "load_components", "save_full_pipeline", "export_pipeline",
           "Trainer", "TrainData", "main"]

COMPLETE = "COMPLETE"              # marker file: a checkpoint folder is whole
CKPT_PREFIX = "checkpoint-"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class ConfigError(ValueError):
    """A training config the trainer refuses, raised before any training starts; names the field and the fix."""


# ----------------------------------------------------------------------------------------------- the config

@dataclass
class ModelSection:
    """Which model to start from.

    arch:       architecture built with random weights when `pretrained` is null (cosmiclite.models.ARCHITECTURES).
    pretrained: null (random init of `arch`: the from-scratch toy base), "toy" (the kit's trained toy model),
                or a diffusers pipeline folder / cached hub id / short name ("sd15", "sdxl", ...) for load_pipeline.
    vae:        a folder holding a trained AutoencoderKL (what `stage: vae` writes to OUTPUT/vae), used instead.
    init_seed:  seed of the random initialisation.
    text_encoder_fp16: round the frozen text encoder's weights to fp16 before training and save it in fp16. The
                toy encoder's 49,408 x 128 token table is 25 MB in fp32; in fp16 the shipped toy model stays under
                40 MB, and since the UNet trains on the rounded weights it sees exactly what ships.
                (Load such a pipeline with torch_dtype=torch.float32 to compute in fp32.)
    """
    arch: str = "toy"
    pretrained: str | None = "toy"
    vae: str | None = None
    init_seed: int = 0
    text_encoder_fp16: bool = False


@dataclass
class CaptionSection:
    """Caption augmentation as CosmicMan trains (Sec. 4.2): body group first, the rest shuffled and dropped."""
    shuffle_groups: bool = True
    group_drop: float = 0.05      # each non-body group left out of the caption with this probability
    uncond: float = 0.1           # the whole caption replaced by "" (classifier-free guidance dropout)


@dataclass
class DataSection:
    """Where the images come from.

    source:      "toy" (people drawn on the fly by cosmiclite.toyworld; masks exact) or "folder" (an imagefolder
                 written by cosmiclite.data: images + metadata with answers, and parsing maps for masks).
    path:        the folder for source=folder.
    image_size:  pixels (toy: the render size; folder: images are resized to it).
    num_samples: toy: how many distinct people (seeds first_seed … first_seed+num_samples−1); null = a new person
                 for every sample. folder: ignored (all images).
    latent_pool: encode every image once (mean and std of E(x)) and draw z_0 = mean + std·ε at each step
                 instead of rendering and encoding (≈0.26 s/step saved on the toy model, DESIGN.md); needs a
                 finite dataset (toy: num_samples).
    mask_sizes:  mask sides to build (must include every HOLA resolution; null = the HOLA resolutions).
    """
    source: str = "toy"
    path: str | None = None
    image_size: int = 64
    num_samples: int | None = None
    first_seed: int = 0
    latent_pool: bool = False
    num_workers: int = 0
    mask_sizes: list[int] | None = None
    caption: CaptionSection = field(default_factory=CaptionSection)


@dataclass
class LoraSection:
    """peft LoraConfig on the UNet's attention projections (null lora = full fine-tune)."""
    rank: int = 4
    alpha: float = 4.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0


@dataclass
class OptimSection:
    """AdamW (8-bit from bitsandbytes when asked and installed) and a diffusers LR schedule."""
    lr: float = 1e-4
    scale_lr: bool = False         # lr × global batch (batch_size × processes × grad_accum): linear scaling rule
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    use_8bit_adam: bool = False
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler names
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class EmaSection:
    """An exponential moving average of the UNet's weights (full fine-tune only; diffusers.training_utils.EMAModel).

    The EMA weights are what OUTPUT/pipeline holds (the raw last weights go to OUTPUT/unet_raw) and what validation
    samples with. Shadow weights are fp32 on the training device: one more fp32 copy of the UNet per process.
    """
    decay: float = 0.9999
    update_after_step: int = 0
    use_ema_warmup: bool = False   # decay ramps up as 1 − (1 + step/inv_gamma)^−power
    inv_gamma: float = 1.0
    power: float = 2 / 3


@dataclass
class ValidationSection:
    """Sample images every `every` steps (0 = never) from `prompts` into OUTPUT/validation/."""
    every: int = 0
    prompts: list[str] = field(default_factory=list)
    steps: int = 25
    guidance: float = 5.0
    seed: int = 0


@dataclass
class RunSection:
    """The loop itself."""
    batch_size: int = 4                   # per process
    grad_accum: int = 1
    max_steps: int = 100                  # optimizer steps
    mixed_precision: str = "no"           # no | fp16 | bf16
    gradient_checkpointing: bool = False
    timestep_gamma: float = 1.0           # t = ⌊T·u^γ⌋, u ~ U(0,1): γ < 1 puts more steps at high t (noisy)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = False
    kl_weight: float = 1e-4               # stage vae: L = MSE + kl_weight · KL (KL averaged per latent element)
    threads: int | None = None            # torch.set_num_threads on CPU (null: torch's default)


@dataclass
class TrainConfig:
    """A training run. Load with `load_config(path)`; every field has a default except what the run needs."""
    stage: str = "unet"                   # unet | vae
    seed: int = 0
    output: str = "runs/train"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection | None = None       # null: full fine-tune of the UNet
    ema: EmaSection | None = None         # null: no EMA
    hola: HolaConfig = field(default_factory=lambda: HolaConfig(beta=0.0))
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hola"] = self.hola.to_dict()
        return d


def _build(cls, d: Any, where: str):
    """A dataclass from a mapping, refusing unknown keys (naming the full key path and the known ones)."""
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(d).__name__} {d!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    kw = {}
    for k, v in d.items():
        sub = {"model": ModelSection, "data": DataSection, "caption": CaptionSection, "lora": LoraSection,
               "ema": EmaSection, "optim": OptimSection, "run": RunSection, "validation": ValidationSection}.get(k)
        if sub is not None and (cls is TrainConfig or (cls is DataSection and k == "caption")):
            kw[k] = _build(sub, v, f"{where}.{k}")
        elif cls is TrainConfig and k == "hola":
            try:
                kw[k] = HolaConfig.from_dict(v)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}.hola: {e}") from None
        else:
            kw[k] = v
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def validate(cfg: TrainConfig) -> TrainConfig:
    """Every check that can fail before training starts (the loop itself should not fail on config)."""
    if cfg.stage not in ("unet", "vae"):
        raise ConfigError(f"stage={cfg.stage!r}: use 'unet' (the denoiser, Eq. 4) or 'vae' (the toy autoencoder)")
    d, r = cfg.data, cfg.run
    if d.source not in ("toy", "folder"):
        raise ConfigError(f"data.source={d.source!r}: use 'toy' (drawn on the fly) or 'folder' (cosmiclite.data)")
    if d.source == "folder":
        if not d.path:
            raise ConfigError("data.path is missing: data.source=folder needs the dataset folder "
                              "(write one with `cosmiclite data` / cosmiclite.data)")
        if not Path(d.path).expanduser().is_dir():
            raise ConfigError(f"data.path={d.path!r} does not exist: point it at a dataset folder "
                              "(write one with cosmiclite.data) or use data.source: toy")
    for name, v in (("run.batch_size", r.batch_size), ("run.grad_accum", r.grad_accum), ("run.max_steps", r.max_steps),
                    ("run.checkpoint_every", r.checkpoint_every), ("run.log_every", r.log_every),
                    ("data.image_size", d.image_size)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}={v!r}: must be a positive integer")
    if d.latent_pool and d.source == "toy" and d.num_samples is None:
        raise ConfigError("data.latent_pool: true encodes a finite set of images once: set data.num_samples "
                          "(e.g. 20000) or data.latent_pool: false")
    if d.num_samples is not None and (not isinstance(d.num_samples, int) or d.num_samples < 1):
        raise ConfigError(f"data.num_samples={d.num_samples!r}: a positive integer, or null for endless toy people")
    if r.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"run.mixed_precision={r.mixed_precision!r}: use no, fp16 or bf16")
    if r.timestep_gamma <= 0:
        raise ConfigError(f"run.timestep_gamma={r.timestep_gamma}: must be > 0 (1 = uniform timesteps)")
    for name, p in (("data.caption.group_drop", d.caption.group_drop), ("data.caption.uncond", d.caption.uncond)):
        if not 0 <= p <= 1:
            raise ConfigError(f"{name}={p}: a probability in [0, 1]")
    if cfg.lora is not None:
        if not isinstance(cfg.lora.rank, int) or cfg.lora.rank < 1:
            raise ConfigError(f"lora.rank={cfg.lora.rank!r}: a LoRA needs rank >= 1 (e.g. 4); "
                              "for a full fine-tune set `lora: null`")
        if not cfg.lora.targets:
            raise ConfigError("lora.targets is empty: name the UNet modules to adapt, e.g. [to_q, to_k, to_v, to_out.0]")
        if cfg.stage == "vae":
            raise ConfigError("lora is set but stage=vae trains the whole autoencoder: set `lora: null`")
    if cfg.ema is not None:
        if cfg.lora is not None or cfg.stage == "vae":
            raise ConfigError("ema is set but only the full fine-tune of the UNet keeps an EMA: set `ema: null` "
                              "(or `lora: null` and stage: unet)")
        if not 0 < cfg.ema.decay < 1:
            raise ConfigError(f"ema.decay={cfg.ema.decay}: must be in (0, 1), e.g. 0.9999")
    if cfg.hola.beta > 0:
        if cfg.stage == "vae":
            raise ConfigError("hola.beta > 0 with stage=vae: HOLA supervises UNet cross-attention; set hola.beta: 0")
        if not _data_has_masks(d):
            raise ConfigError(f"hola.beta={cfg.hola.beta} but the dataset at {d.path!r} has no parsing masks: "
                              "HOLA (Eq. 3) needs a mask per group; set hola.beta: 0 or use a dataset with masks")
        if isinstance(cfg.hola.resolutions, str) and cfg.hola.resolutions.startswith("1/"):
            pass  # resolved against the image size and the captured maps at the first step
        if d.mask_sizes is not None and isinstance(cfg.hola.resolutions, tuple):
            missing = [s for s in cfg.hola.resolutions if s not in d.mask_sizes]
            if missing:
                raise ConfigError(f"data.mask_sizes={d.mask_sizes} lacks the HOLA resolutions {missing}")
    if cfg.optim.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("optim.use_8bit_adam is true but bitsandbytes is not installed: "
                              "`pip install bitsandbytes` (CUDA) or set optim.use_8bit_adam: false") from None
    if cfg.stage == "vae" and cfg.model.pretrained is not None:
        raise ConfigError("stage=vae trains an autoencoder from scratch: set model.pretrained: null")
    from .models import ARCHITECTURES
    if cfg.model.pretrained is None and cfg.model.arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch={cfg.model.arch!r}: use one of {sorted(ARCHITECTURES)}")
    return cfg


def _data_has_masks(d: DataSection) -> bool:
    if d.source == "toy":
        return True  # the toy world draws its parsing map with every person
    meta = Path(d.path).expanduser() / "metadata.jsonl"
    if not meta.is_file():
        raise ConfigError(f"data.path={d.path!r} has no metadata.jsonl: not a dataset folder written by cosmiclite.data "
                          "(make one with `cosmiclite toyworld --n 1000 --out DIR`)")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    return bool(rows) and all(r.get("parsing_file_name") for r in rows)


def load_config(path: str | Path | Mapping, **overrides) -> TrainConfig:
    """Read a YAML config (or a dict), apply dotted overrides (`run.max_steps=5`), validate. Raises ConfigError."""
    import yaml
    if isinstance(path, Mapping):
        raw = dict(path)
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (presets live in configs/, e.g. configs/toy_lora.yaml)")
        raw = yaml.safe_load(p.read_text()) or {}
    raw = json.loads(json.dumps(raw))  # a deep copy
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {}) if node.get(k) is not None else node.setdefault(k, {}) or {}
        node[last] = value
    return validate(_build(TrainConfig, raw, "config"))


# ----------------------------------------------------------------------------------------------- randomness

def sample_seed(*keys: int) -> int:
    """A 63-bit seed from (run seed, sample position, purpose): what makes resume and data parallelism exact.

    Every random draw of a training sample (which person, caption augmentation, z_0 ~ q(z|x), ε, t, the HOLA
    drop) is keyed by the sample's global position in the run, never by a process's RNG stream: so a resumed
    run replays the same draws, and 2 processes × batch b draw exactly what 1 process × batch 2b draws.
    """
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & (2 ** 63 - 1)


# purposes of the per-sample draws
_PICK, _CAPTION, _LATENT, _NOISE, _TIME, _DROP = range(1, 7)


def per_sample_randn(seed: int, pos: torch.Tensor, purpose: int, shape: Sequence[int]) -> torch.Tensor:
    """(B, *shape) standard normals, row b drawn from its own generator keyed by pos[b]."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, int(p), purpose)))
                        for p in pos])


def per_sample_rand(seed: int, pos: torch.Tensor, purpose: int) -> torch.Tensor:
    """(B,) uniforms in [0, 1), one per sample, keyed by its position."""
    return torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(sample_seed(seed, int(p), purpose)))
                      for p in pos])


def sample_timesteps(u: torch.Tensor, num_train_timesteps: int, gamma: float) -> torch.Tensor:
    """t = ⌊T·u^γ⌋ for uniforms u: uniform for γ = 1; γ < 1 gives the noisy steps, where prompts matter, more weight."""
    return (num_train_timesteps * u.pow(gamma)).long().clamp_(0, num_train_timesteps - 1)


# ----------------------------------------------------------------------------------------------- checkpoints

def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, folder), oldest first; folders without the COMPLETE marker are ignored."""
    out = []
    for p in Path(output, "checkpoints").glob(CKPT_PREFIX + "*"):
        marker = p / COMPLETE
        if p.is_dir() and marker.is_file():
            try:
                out.append((int(json.loads(marker.read_text())["step"]), p))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue  # a damaged marker: not a checkpoint we trust
    return sorted(out)


def latest_checkpoint(output: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint of a run folder, or None."""
    cps = list_checkpoints(Path(output))
    return cps[-1] if cps else None


def load_components(cfg: TrainConfig) -> dict:
    """The model components a config starts from, on the CPU in fp32 (`stage: vae`: the VAE alone).

    `model.pretrained` null builds `model.arch` with seeded random weights; "toy" loads the shipped toy model;
    anything else goes to `models.load_pipeline`. `model.vae` swaps in a trained AutoencoderKL, and
    `model.text_encoder_fp16` rounds the frozen text encoder(s) to the fp16 values that will be saved.
    """
    from . import models
    m = cfg.model
    if cfg.stage == "vae":
        return {"vae": models.build_vae(m.arch, m.init_seed)}
    if m.pretrained is None:
        comps = models.build_components(m.arch, m.init_seed)
    elif m.pretrained == "toy":
        if not (models.TOY_MODEL_DIR / "model_index.json").is_file():
            models.load_toy_pipeline()  # raises WeightsNotFoundError saying how to make the toy model
        comps = dict(models.load_pipeline(models.TOY_MODEL_DIR, torch_dtype=torch.float32).components)
    else:
        comps = dict(models.load_pipeline(m.pretrained, torch_dtype=torch.float32).components)
    if m.text_encoder_fp16:
        for k in ("text_encoder", "text_encoder_2"):
            if k in comps:
                comps[k].half().float()   # round to what will be saved
    if m.vae is not None:
        from diffusers import AutoencoderKL
        vae_dir = Path(m.vae).expanduser()
        if not (vae_dir / "config.json").is_file():
            raise ConfigError(f"model.vae={m.vae!r} holds no AutoencoderKL (config.json missing): train one "
                              "with a `stage: vae` config first (it writes OUTPUT/vae)")
        comps["vae"] = AutoencoderKL.from_pretrained(vae_dir)
    return {k: v for k, v in comps.items() if v is not None}


def save_full_pipeline(cfg: TrainConfig, components: dict, unet, folder: str | Path) -> Path:
    """A full fine-tune's UNet with the run's other components as a diffusers pipeline folder, with the run's
    config beside it as train_config.yaml (the text encoders in fp16 when `model.text_encoder_fp16`)."""
    import copy

    import yaml

    from .models import save_pipeline
    comps = dict(components)
    comps["unet"] = unet
    if cfg.model.text_encoder_fp16:
        for k in ("text_encoder", "text_encoder_2"):
            if k in comps:
                comps[k] = copy.deepcopy(comps[k]).half()
    folder = save_pipeline(comps, folder)
    (folder / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return folder


def export_pipeline(run: str | Path, out: str | Path, step: int | None = None) -> Path:
    """A full fine-tune checkpoint (the newest, or `step`) as a diffusers pipeline folder at `out`.

    What the run itself writes to OUTPUT/pipeline when it ends, taken from any complete checkpoint: to use a
    model before its run is over, or one from the middle of it. The EMA weights are used when the checkpoint
    holds them. The checkpoint's own config (trainer_state.json) says how to rebuild the other components.
    """
    from safetensors.torch import load_file
    cps = list_checkpoints(Path(run))
    if not cps:
        raise FileNotFoundError(f"{run}: no complete checkpoint under {run}/checkpoints (a training run's --output)")
    chosen = [c for c in cps if step is None or c[0] == step]
    if not chosen:
        raise ValueError(f"{run}: no complete checkpoint at step {step}; there are: {[s for s, _ in cps]}")
    at, ckpt = chosen[-1]
    cfg = load_config(json.loads((ckpt / "trainer_state.json").read_text())["config"])
    if cfg.stage != "unet" or cfg.lora is not None:
        raise ConfigError(f"{ckpt} is from a {'LoRA' if cfg.lora else cfg.stage} run: only full UNet fine-tunes "
                          "export as a pipeline (a LoRA run's OUTPUT/lora loads with pipe.load_lora_weights)")
    comps = load_components(cfg)
    weights = ckpt / "ema_unet.safetensors"
    weights = weights if weights.is_file() else ckpt / "model.safetensors"
    comps["unet"].load_state_dict(load_file(str(weights)))
    folder = save_full_pipeline(cfg, comps, comps["unet"], out)
    (folder / "checkpoint.json").write_text(json.dumps({"run": str(run), "step": at, "weights": weights.name}))
    return folder


# ----------------------------------------------------------------------------------------------- the trainer

def _text_embeddings(components: dict, input_ids: torch.Tensor, image_size: int, device, dtype):
    """τ(c): SD's last hidden state, or SDXL's two penultimate states concatenated plus pooled/time conditioning."""
    ids = input_ids.to(device)
    if "text_encoder_2" not in components:
        return components["text_encoder"](ids)[0].to(dtype), None
    tok2 = components["tokenizer_2"]
    # Both SDXL tokenizers share the BPE; only the padding after the end token differs ("!" = id 0).
    eos = components["tokenizer"].eos_token_id
    after_end = (ids == eos).int().cumsum(1) > 1
    ids2 = ids.masked_fill(after_end, tok2.pad_token_id)
    h1 = components["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
    o2 = components["text_encoder_2"](ids2, output_hidden_states=True)
    states = torch.cat([h1, o2.hidden_states[-2]], dim=-1).to(dtype)
    time_ids = torch.tensor([image_size, image_size, 0, 0, image_size, image_size], device=device, dtype=dtype)
    added = {"text_embeds": o2.text_embeds.to(dtype), "time_ids": time_ids.repeat(ids.shape[0], 1)}
    return states, added


def keep_freed_memory() -> bool:
    """On glibc, keep freed memory in the process for reuse instead of handing it back to the OS; True if set.

    A CPU training step allocates and frees the same large tensors every step (HOLA's attention maps: 10 MB a
    layer at the toy preset's batch 16). glibc serves such blocks by mmap and gives them back by munmap or by
    trimming the heap, so the next step faults every page in again (each 4 KB zeroed by the kernel). With the mmap
    threshold at its maximum (32 MiB on 64-bit) and no trimming they stay: on a 2-core CPU the toy preset's HOLA
    step got ~5 % faster at batch 16 (hola_overhead 1.11 against 1.16), the plain step unchanged (README,
    Benchmarks). The process's memory stays at its peak, which a training run reaches every step anyway. Setting
    the trim threshold alone made steps slower (it also turns glibc's adaptive mmap threshold off): both are set.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class Trainer:
    """One training run: models, data, optimizer, the loop, checkpoints and outputs (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, output: str | Path | None = None):
        from accelerate import Accelerator
        from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, GradientAccumulationPlugin,
                                      ProjectConfiguration)

        self.cfg = cfg
        self.output = Path(output or cfg.output)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        # gradient_accumulation_steps: accelerate's accumulate() skips the DDP/FSDP all-reduce on the first
        # grad_accum − 1 micro-steps and tells DeepSpeed its accumulation. step_scheduler_with_optimizer=False:
        # the LR schedule counts optimizer steps whatever the process count (a checkpoint resumes under any W).
        # gradient_as_bucket_view: DDP's gradients live in its all-reduce buckets (no second fp32 gradient copy).
        # Launched by torchrun/accelerate with several processes on a machine without a GPU: accelerate 1.x forms
        # the gloo group (DistributedType.MULTI_CPU) only when told cpu=True; otherwise every process would train
        # alone, each believing it is the only one.
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        cpu_group = world_env > 1 and not torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision=cfg.run.mixed_precision, cpu=cpu_group,
                               # a plugin, not gradient_accumulation_steps=: accelerate launch's environment
                               # (ACCELERATE_GRADIENT_ACCUMULATION_STEPS) must not override run.grad_accum
                               gradient_accumulation_plugin=GradientAccumulationPlugin(
                                   num_steps=cfg.run.grad_accum, sync_with_dataloader=False),
                               step_scheduler_with_optimizer=False,
                               kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
                               project_config=ProjectConfiguration(project_dir=str(self.output)),
                               log_with="tensorboard" if cfg.run.tensorboard else None)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if self.acc.device.type == "cpu":
            keep_freed_memory()
        if self.world != world_env:
            raise RuntimeError(f"WORLD_SIZE={world_env} but accelerate formed a group of {self.world} process(es) "
                               f"({self.acc.distributed_type}): launch with `accelerate launch` or `torchrun`")
        self.mode = self.acc.distributed_type
        self.is_fsdp, self.is_deepspeed = self.mode == DistributedType.FSDP, self.mode == DistributedType.DEEPSPEED
        if cfg.stage == "vae" and self.world > 1:
            raise ConfigError("stage=vae runs on one process (the toy autoencoder is small): launch it without "
                              "accelerate/torchrun multi-process")
        if cfg.ema is not None and self.is_fsdp:
            raise ConfigError("ema is set but FSDP shards the UNet's weights (an EMA would hold shards): use DDP "
                              "(configs/accelerate/multi_gpu.yaml) or DeepSpeed ZeRO-2 for EMA, or set `ema: null`")
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.run.mixed_precision, torch.float32)
        self.components = self._load_components()
        self.image_size = cfg.data.image_size
        self.data = TrainData(cfg, self.components, rank=self.rank, world=self.world)
        self.model = self._prepare_trainable()
        self.ema = self._make_ema(self.model) if cfg.ema is not None else None   # fp32 copies, before any cast
        self.optimizer, self.lr_scheduler = self._optimizer()
        if self.is_deepspeed:
            self._fill_deepspeed_config()
        self.model, self.optimizer, self.lr_scheduler = self.acc.prepare(self.model, self.optimizer, self.lr_scheduler)
        # The UNet's input dtype: autocast casts for DDP/FSDP/one process; DeepSpeed (and the LoRA base) hold the
        # weights themselves in the training dtype, so z_t must come in that dtype.
        self.input_dtype = self.weight_dtype if (cfg.lora is not None or self.is_deepspeed) else torch.float32
        if cfg.lora is not None:
            self._register_lora_hooks()
        self.store = None
        self._capture = None
        if cfg.stage == "unet" and cfg.hola.beta > 0:
            from .attention import capture_cross_attention
            res = cfg.hola.sides(self._captured_sides(), self.image_size)
            self._capture = capture_cross_attention(self.acc.unwrap_model(self.model), "training", resolutions=res,
                                                    **cfg.hola.capture_options())
            self.store = self._capture.__enter__()
        self.step = 0

    # ---- models
    def _load_components(self) -> dict:
        comps = load_components(self.cfg)
        if self.cfg.stage == "vae":
            return comps
        dev = self.acc.device
        for k in ("vae", "text_encoder", "text_encoder_2"):
            if k in comps:
                comps[k].requires_grad_(False).eval().to(dev)
                if self.weight_dtype != torch.float32 and not (k == "vae" and dev.type == "cpu"):
                    comps[k].to(dtype=self.weight_dtype)
        from . import models
        self.noise_scheduler = models.training_scheduler(comps["scheduler"])
        return comps

    def _captured_sides(self) -> list[int]:
        """Map sides of the UNet's cross-attention layers at this image size (one dry shape walk, no forward)."""
        unet = self.components["unet"]
        latent = self.image_size // 2 ** (len(self.components["vae"].config.block_out_channels) - 1)
        sides, s = [], latent
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sides.append(s)
            if block.downsamplers is not None:
                s = math.ceil(s / 2)
        if getattr(unet.mid_block, "has_cross_attention", False):
            sides.append(s)
        return sorted(set(sides))

    def _prepare_trainable(self) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.stage == "vae":
            vae = self.components["vae"].to(self.acc.device)
            vae.requires_grad_(True).train()
            return vae
        unet = self.components["unet"]
        if cfg.lora is not None:
            from peft import LoraConfig
            unet.requires_grad_(False).to(self.acc.device)
            if self.weight_dtype != torch.float32:   # the frozen base in half precision, the adapter in fp32
                unet.to(dtype=self.weight_dtype)
            # The adapter's initial A matrices come from torch's global RNG, which torch seeds at random in every
            # process and a pretrained model's loading does not reseed: draw them from cfg.seed alone (the same run
            # in any process), leaving the global RNG as found
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                            init_lora_weights="gaussian", target_modules=list(cfg.lora.targets)))
            for p in unet.parameters():      # trainable LoRA weights stay in fp32 under fp16/bf16
                if p.requires_grad:
                    p.data = p.data.float()
            if not any(p.requires_grad for p in unet.parameters()):
                raise ConfigError(f"lora.targets={cfg.lora.targets} matched no UNet module: use attention "
                                  "projection names such as to_q, to_k, to_v, to_out.0")
        else:
            unet.requires_grad_(True).to(self.acc.device)
        unet.train()
        if cfg.run.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet

    def _optimizer(self):
        from diffusers.optimization import get_scheduler
        o, r = self.cfg.optim, self.cfg.run
        lr = o.lr * (global_batch(r.batch_size, self.world, r.grad_accum) if o.scale_lr else 1)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o.use_8bit_adam:
            import bitsandbytes as bnb
            opt_cls = bnb.optim.AdamW8bit
        else:
            opt_cls = torch.optim.AdamW
        opt = opt_cls(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
        # counted in optimizer steps: the loop steps it once per optimizer step (step_scheduler_with_optimizer=False)
        sched = get_scheduler(o.lr_scheduler, opt, num_warmup_steps=o.warmup_steps, num_training_steps=r.max_steps)
        return opt, sched

    def _fill_deepspeed_config(self) -> None:
        """DeepSpeed reads batch, accumulation and clipping from its own config: fill them from the cosmiclite
        config (no dataloader is prepared, so accelerate cannot infer the micro-batch)."""
        ds = self.acc.state.deepspeed_plugin.deepspeed_config
        r = self.cfg.run
        ds["train_micro_batch_size_per_gpu"] = r.batch_size
        ds["gradient_accumulation_steps"] = r.grad_accum
        ds["train_batch_size"] = global_batch(r.batch_size, self.world, r.grad_accum)
        ds["gradient_clipping"] = float(self.cfg.optim.max_grad_norm or 0.0)
        if self.cfg.optim.use_8bit_adam:
            ds["zero_allow_untested_optimizer"] = True

    # ---- EMA
    def _make_ema(self, unet):
        from diffusers.training_utils import EMAModel
        e = self.cfg.ema
        return EMAModel([p for p in unet.parameters()], decay=e.decay, update_after_step=e.update_after_step,
                        use_ema_warmup=e.use_ema_warmup, inv_gamma=e.inv_gamma, power=e.power,
                        model_cls=type(unet), model_config=unet.config)

    def _ema_params(self) -> list[torch.nn.Parameter]:
        return list(self.acc.unwrap_model(self.model).parameters())

    def _save_ema(self, folder: Path) -> None:
        from safetensors.torch import save_file
        names = [n for n, _ in self.acc.unwrap_model(self.model).named_parameters()]
        save_file({n: t.detach().cpu().contiguous() for n, t in zip(names, self.ema.shadow_params)},
                  str(folder / "ema_unet.safetensors"))
        (folder / "ema_state.json").write_text(json.dumps({"optimization_step": self.ema.optimization_step,
                                                           "decay": self.ema.decay}))

    def _load_ema(self, folder: Path) -> None:
        from safetensors.torch import load_file
        f = folder / "ema_unet.safetensors"
        if not f.is_file():
            raise RuntimeError(f"checkpoint {folder} holds no EMA weights (ema_unet.safetensors) but this config has "
                               "`ema:` set: resume with the config that wrote it, or start a new --output")
        state = load_file(str(f))
        names = [n for n, _ in self.acc.unwrap_model(self.model).named_parameters()]
        with torch.no_grad():
            for n, s in zip(names, self.ema.shadow_params):
                s.copy_(state[n])
        self.ema.optimization_step = json.loads((folder / "ema_state.json").read_text())["optimization_step"]

    # ---- checkpoints
    def _register_lora_hooks(self) -> None:
        """LoRA runs save/load only the trainable adapter weights in checkpoints (not the frozen base UNet)."""
        from safetensors.torch import load_file, save_file

        def save_hook(models, weights, out_dir):
            for i, m in enumerate(models):
                state = {n: p.detach().cpu().contiguous() for n, p in self.acc.unwrap_model(m).named_parameters()
                         if p.requires_grad}
                if self.acc.is_main_process:
                    save_file(state, str(Path(out_dir, f"trainable_{i}.safetensors")))
            weights.clear()

        def load_hook(models, in_dir):
            for i in range(len(models)):
                m = self.acc.unwrap_model(models[i])
                state = load_file(str(Path(in_dir, f"trainable_{i}.safetensors")))
                params = dict(m.named_parameters())
                missing = [n for n, p in params.items() if p.requires_grad and n not in state]
                if missing:
                    raise RuntimeError(f"checkpoint {in_dir} lacks trainable weights {missing[:3]}…: "
                                       "was it written by a run with another lora config?")
                with torch.no_grad():
                    for n, t in state.items():
                        params[n].copy_(t)
            models.clear()

        self.acc.register_save_state_pre_hook(save_hook)
        self.acc.register_load_state_pre_hook(load_hook)

    def save_checkpoint(self) -> Path:
        """Atomic: write into checkpoints/.tmp-checkpoint-N, fsync, COMPLETE marker, rename; prune old ones."""
        root = self.output / "checkpoints"
        final = root / f"{CKPT_PREFIX}{self.step}"
        tmp = root / f".tmp-{CKPT_PREFIX}{self.step}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp), safe_serialization=True)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step, "world": self.world,
                                                                "config": self.cfg.to_dict()}))
            if self.ema is not None:
                self._save_ema(tmp)
            _fsync_tree(tmp)
            (tmp / COMPLETE).write_text(json.dumps({"step": self.step}))
            _fsync_tree(tmp)
            if final.exists():               # e.g. a run restarted from an older checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            fd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            for _, old in list_checkpoints(self.output)[:-max(self.cfg.run.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def resume(self) -> int:
        """Load the newest complete checkpoint (partial temp folders are removed, never read). Returns its step."""
        if self.acc.is_main_process:
            for junk in Path(self.output, "checkpoints").glob(f".tmp-{CKPT_PREFIX}*"):
                shutil.rmtree(junk, ignore_errors=True)
        self.acc.wait_for_everyone()
        found = latest_checkpoint(self.output)
        if found is None:
            return 0
        self.step, folder = found
        self.acc.load_state(str(folder))
        if self.ema is not None:
            self._load_ema(folder)
        return self.step

    # ---- losses
    def unet_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Eq. 4 on one micro-batch."""
        cfg, dev, pos = self.cfg, self.acc.device, batch["pos"]
        z0 = self.data.latents(batch).to(dev, torch.float32)
        noise = per_sample_randn(cfg.seed, pos, _NOISE, z0.shape[1:]).to(dev)
        t = sample_timesteps(per_sample_rand(cfg.seed, pos, _TIME), self.noise_scheduler.config.num_train_timesteps,
                             cfg.run.timestep_gamma).to(dev)
        zt = self.noise_scheduler.add_noise(z0, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(z0, noise, t)
        else:
            target = noise
        with torch.no_grad():
            states, added = _text_embeddings(self.components, batch["input_ids"], self.image_size, dev, self.weight_dtype)
        with self.acc.autocast():
            pred = self.model(zt.to(self.input_dtype), t, states, added_cond_kwargs=added).sample
        noise_loss = F.mse_loss(pred.float(), target.float())
        out = {"noise_loss": noise_loss}
        loss = cfg.hola.alpha * noise_loss
        if self.store is not None:
            keep = per_sample_rand(cfg.seed, pos, _DROP) >= cfg.hola.drop_prob    # CosmicMan drops 10 %
            keep = keep.to(dev) & cfg.hola.in_t_range(t)
            terms = hola_terms(self.store.token_major_maps(), batch["spans"],
                               {k: v.to(dev) for k, v in batch["masks"].items()}, batch["present"], cfg.hola,
                               image_size=self.image_size, keep=keep, token_major=True)
            hola = terms.loss * self._hola_dp_weight(terms.n_samples) if self.world > 1 else terms.loss
            loss = loss + cfg.hola.beta * hola
            out["hola_loss"] = hola
        out["loss"] = loss
        return out

    def _hola_dp_weight(self, n_local: int) -> float:
        """L_HOLA is a mean over the samples that count (kept, with a group in the loss). DDP averages the W
        processes' gradients, which equals the global batch's mean only if every process counts as many samples.
        Weighting process r's mean by W·n_r / Σ n makes the average of the W losses (and gradients) exactly the
        mean over the global micro-batch, i.e. what one process with batch W·B computes."""
        n = torch.tensor([float(n_local)], device=self.acc.device)
        total = float(self.acc.reduce(n, reduction="sum").item())
        return self.world * n_local / total if total > 0 else 0.0

    def vae_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """The toy autoencoder: L = MSE(D(z), x) + kl_weight · KL(q(z|x) ‖ N(0, I)), z ~ q(z|x)."""
        x = batch["pixel_values"].to(self.acc.device, torch.float32)
        vae = self.acc.unwrap_model(self.model)
        with self.acc.autocast():
            post = vae.encode(x).latent_dist
            eps = per_sample_randn(self.cfg.seed, batch["pos"], _LATENT, post.mean.shape[1:]).to(x.device)
            rec = vae.decode(post.mean + post.std * eps).sample
        mse = F.mse_loss(rec.float(), x)
        kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1 - post.logvar.float()).mean()
        psnr = 10 * torch.log10(4.0 / mse.detach())      # images in [-1, 1]: peak-to-peak 2
        return {"loss": mse + self.cfg.run.kl_weight * kl, "mse": mse, "kl": kl, "psnr": psnr}

    # ---- the loop
    def run(self, max_steps: int | None = None, resume: bool = False, stop_after: int | None = None) -> dict:
        cfg = self.cfg
        total = max_steps or cfg.run.max_steps
        if resume:
            self.resume()
        elif latest_checkpoint(self.output) is not None:     # every rank raises (no rank left waiting in a barrier)
            raise FileExistsError(f"{self.output} already holds checkpoints: pass --resume to continue that run, "
                                  "or choose another --output")
        self._write_config()
        if cfg.run.tensorboard:
            self.acc.init_trackers("cosmiclite", config={"stage": cfg.stage})
        log = _CsvLog(self.output / "log.csv", self.acc.is_main_process, append=resume, after_step=self.step)
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=self.step, desc=f"train {cfg.stage}", disable=not self.acc.is_local_main_process)
        loss_fn = self.vae_loss if cfg.stage == "vae" else self.unet_loss
        self.data.prepare(self)
        params = [p for p in self.model.parameters() if p.requires_grad]
        t_last, n_last, last = time.perf_counter(), self.step, {}
        while self.step < total:
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.run.grad_accum):
                batch = self.data.batch(self.step * cfg.run.grad_accum + micro)
                # accumulate(): no gradient all-reduce until the last micro-step; backward divides by grad_accum
                with self.acc.accumulate(self.model):
                    out = loss_fn(batch)
                    self.acc.backward(out["loss"])
                    if self.acc.sync_gradients:
                        if cfg.optim.max_grad_norm:
                            self.acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)   # DeepSpeed: its config
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float().reshape(1) / cfg.run.grad_accum
            if self.ema is not None:
                self.ema.step(self._ema_params())
            self.step += 1
            # the losses of the whole global batch: the mean over processes (each already a mean over its samples)
            keys = list(sums)                     # the same order on every process
            mean = self.acc.reduce(torch.cat([sums[k] for k in keys]).to(self.acc.device), reduction="mean")
            acc_logs = {k: float(v) for k, v in zip(keys, mean.cpu())}
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in acc_logs.items()})
            if self.step % cfg.run.log_every == 0 or self.step == total:
                now = time.perf_counter()
                s_per_step = (now - t_last) / max(self.step - n_last, 1)
                t_last, n_last = now, self.step
                row = {"step": self.step, **{k: round(v, 6) for k, v in acc_logs.items()},
                       "lr": self.lr_scheduler.get_last_lr()[0], "s_per_step": round(s_per_step, 4),
                       "images_per_s": round(global_batch(cfg.run.batch_size, self.world, cfg.run.grad_accum)
                                             / s_per_step, 3)}
                if self.acc.device.type == "cuda":        # this process's peak since the start
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.acc.device) / GiB, 3)
                log.write(row)
                if cfg.run.tensorboard:
                    self.acc.log(row, step=self.step)
                last = row
            if self.step % cfg.run.checkpoint_every == 0 or self.step == total:
                self.save_checkpoint()
            if cfg.validation.every and self.step % cfg.validation.every == 0 and cfg.stage == "unet":
                self.validate()
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        self.save_outputs()
        self.acc.end_training()
        return {"step": self.step, "output": str(self.output), **last}

    # ---- outputs
    def _write_config(self) -> None:
        if self.acc.is_main_process:
            import yaml
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def save_outputs(self) -> None:
        """OUTPUT/vae (stage vae), OUTPUT/lora (diffusers LoRA) or OUTPUT/pipeline (full UNet in a whole pipeline;
        the EMA weights when `ema:` is set, the raw last weights then in OUTPUT/unet_raw)."""
        self.acc.wait_for_everyone()
        full_state = self.acc.get_state_dict(self.model) if self.is_fsdp else None   # collective: every rank
        if not self.acc.is_main_process:
            return
        model = self.acc.unwrap_model(self.model)
        if full_state is not None:        # FSDP: the gathered full weights into a plain copy of the UNet
            from diffusers import UNet2DConditionModel
            model = UNet2DConditionModel.from_config(model.config)
            model.load_state_dict(full_state)
        if self.cfg.stage == "vae":
            info = self.data.calibrate_vae_scaling(model, self.acc.device)
            model.save_pretrained(self.output / "vae", safe_serialization=True)
            (self.output / "vae" / "eval.json").write_text(json.dumps(info, indent=2))
        elif self.cfg.lora is not None:
            save_lora(model, self.output / "lora", self.cfg.lora, sdxl="text_encoder_2" in self.components)
        else:
            if self.ema is not None:   # training is over: the UNet takes the EMA weights for good
                model.save_pretrained(self.output / "unet_raw", safe_serialization=True)
                self.ema.copy_to(model.parameters())
            save_full_pipeline(self.cfg, self.components, model, self.output / "pipeline")

    @contextmanager
    def _ema_weights(self, model):
        """The EMA weights in the model for the duration (diffusers' store / copy_to / restore), or nothing."""
        if self.ema is None:
            yield model
            return
        params = list(model.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield model
        finally:
            self.ema.restore(params)

    @torch.no_grad()
    def validate(self) -> Path | None:
        """Images for the validation prompts with the current weights (the EMA weights when `ema:` is set), on
        the main process only: OUTPUT/validation/step-N.png. Skipped under FSDP (no process holds the weights)."""
        v = self.cfg.validation
        if not v.prompts or not self.acc.is_main_process:
            return None
        if self.is_fsdp:
            if not getattr(self, "_warned_fsdp_validation", False):
                print("cosmiclite.train: validation images are skipped under FSDP (the UNet is sharded across "
                      "processes); sample from OUTPUT/pipeline after training", file=sys.stderr)
                self._warned_fsdp_validation = True
            return None
        from PIL import Image
        from .models import pipeline_from_components
        comps = dict(self.components)
        comps["unet"] = self.acc.unwrap_model(self.model)
        pipe = pipeline_from_components(comps)
        pipe.set_progress_bar_config(disable=True)
        was_training = comps["unet"].training
        comps["unet"].eval()
        with self._capture_paused(), self._ema_weights(comps["unet"]):
            imgs = pipe(list(v.prompts), num_inference_steps=v.steps, guidance_scale=v.guidance,
                        height=self.image_size, width=self.image_size, output_type="np",
                        generator=torch.Generator().manual_seed(v.seed)).images
        comps["unet"].train(was_training)
        grid = np.concatenate([(im * 255).round().astype(np.uint8) for im in imgs], axis=1)
        path = self.output / "validation" / f"step-{self.step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        return path

    def _capture_paused(self):
        """Sampling with CFG doubles the batch: the training capture records nothing useful there, so pause it."""
        store = self.store

        class _Pause:
            def __enter__(s):
                if store is not None:
                    s.res, store.resolutions = store.resolutions, ()

            def __exit__(s, *a):
                if store is not None:
                    store.resolutions = s.res
        return _Pause()


class _CsvLog:
    """log.csv: one row per logged step (columns fixed by the first row). A resumed run keeps the rows up to its
    checkpoint's step and drops the later ones (the steps it replays would otherwise be logged twice)."""

    def __init__(self, path: Path, active: bool, append: bool, after_step: int = 0):
        self.path, self.active = path, active
        self.fields: list[str] | None = None
        if active and append and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or []) or None
                kept = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= after_step]
            if self.fields:
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(kept)
        elif active and path.exists():
            path.unlink()

    def write(self, row: dict) -> None:
        if not self.active:
            return
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


# ----------------------------------------------------------------------------------------------- the data

class TrainData:
    """What each step reads: samples picked by position, captions augmented, masks and latents (see `batch`).

    Sample positions: micro-step k of process r holds the global positions k·B·W + r·B + i (B per-process batch,
    W processes). A finite dataset of N items is walked in a fresh seeded permutation every epoch; the endless
    toy world gives position p the person of seed first_seed + p.
    """

    def __init__(self, cfg: TrainConfig, components: dict, rank: int = 0, world: int = 1):
        from .protocol import load_protocol
        self.cfg, self.d, self.rank, self.world = cfg, cfg.data, rank, world
        self.size = cfg.data.image_size
        self.protocol = load_protocol()
        self.body = [g.name for g in self.protocol.groups if g.level == "body"]
        self.names = [g.name for g in self.protocol.groups if g.atr_labels]   # the G mask groups (masks.mask_set order)
        self.tokenizer = components.get("tokenizer")
        self.vae = components.get("vae") if cfg.stage == "unet" else None
        self.need_masks = cfg.stage == "unet" and cfg.hola.beta > 0
        self.mask_sizes: tuple[int, ...] = tuple(cfg.data.mask_sizes or ())
        self.folder = None
        if self.d.source == "folder":
            from .data import read_imagefolder
            self.folder, report = read_imagefolder(Path(self.d.path).expanduser())
            if not self.folder:
                raise ConfigError(f"data.path={self.d.path!r}: no usable sample ({report})")
            self.n: int | None = len(self.folder)
        else:
            self.n = self.d.num_samples
        self._perms: dict[int, np.ndarray] = {}
        self.pool: dict[str, Any] | None = None
        self._empty_ids: list[int] | None = None

    # ---- which item each position reads
    def positions(self, micro_step: int) -> torch.Tensor:
        B = self.cfg.run.batch_size
        start = micro_step * B * self.world + self.rank * B
        return torch.arange(start, start + B)

    def index(self, pos: int) -> int:
        if self.n is None:
            return self.d.first_seed + pos
        epoch, k = divmod(pos, self.n)
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng(sample_seed(self.cfg.seed, epoch, _PICK)).permutation(self.n)
        return int(self._perms[epoch][k])

    # ---- one item's raw material
    def _raw(self, idx: int) -> tuple[np.ndarray, Any, tuple[np.ndarray, str] | None]:
        """(image uint8 HxWx3, annotation (or caption text), (parsing HxW, label set) or None) of item idx."""
        if self.folder is not None:
            r = self.folder[idx]
            image, parsing = r.image, r.parsing
            if image.shape[:2] != (self.size, self.size):       # resize to the training size
                from PIL import Image
                image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BICUBIC))
                if parsing is not None:
                    parsing = np.asarray(Image.fromarray(parsing).resize((self.size, self.size), Image.NEAREST))
            has_answers = r.annotation is not None and bool(r.annotation.answers)
            return image, (r.annotation if has_answers else (r.caption or "")), \
                (parsing, r.label_set) if parsing is not None else None
        from .toyworld import render
        person = render(self.d.first_seed + idx if self.n is not None else idx, size=self.size)
        return person.image, person.annotation, (person.parsing, "atr")

    def caption_ids(self, annotation, pos: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Augmented caption -> (77 input_ids, spans of the G mask groups) (Sec. 4.2 + CosmicMan's augmentation)."""
        from .captions import compose
        from .discretize import discretize, discretize_text
        cap = self.d.caption
        rng = random.Random(sample_seed(self.cfg.seed, pos, _CAPTION))
        if rng.random() < cap.uncond:    # unconditional dropout: the empty caption, no group
            if self._empty_ids is None:
                self._empty_ids = list(self.tokenizer("", padding="max_length", max_length=77, truncation=True).input_ids)
            return self._empty_ids, [(-1, -1)] * len(self.names)
        if isinstance(annotation, str):  # a caption without answers: no augmentation, free-text spans
            d = discretize_text(annotation, self.tokenizer)
            return list(d.input_ids), d.spans(self.names)
        rest = [g.name for g in self.protocol.groups if g.name not in self.body]
        if cap.shuffle_groups:
            rng.shuffle(rest)
        drop = [g for g in rest if rng.random() < cap.group_drop]
        d = discretize(compose(annotation, self.protocol, group_order=self.body + rest, drop=drop), self.tokenizer)
        return list(d.input_ids), d.spans(self.names)

    def _masks(self, parsings: Sequence[tuple[np.ndarray, str] | None]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        from .masks import mask_set
        blank = (np.zeros((self.size, self.size), np.uint8), "atr")   # no parsing map: every group absent
        sets = [mask_set(p, label_set, sizes=self.mask_sizes) for p, label_set in (q or blank for q in parsings)]
        if list(sets[0].names) != self.names:
            raise RuntimeError(f"masks.mask_set groups {list(sets[0].names)} differ from the protocol's mask groups "
                               f"{self.names}")
        masks = {s: torch.stack([m.masks[s] for m in sets]).float() for s in self.mask_sizes}
        return masks, torch.stack([torch.as_tensor(m.present, dtype=torch.bool) for m in sets])

    @staticmethod
    def _pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    # ---- set-up: mask sizes and the latent pool
    def prepare(self, trainer: "Trainer") -> None:
        if self.need_masks and not self.mask_sizes:
            self.mask_sizes = tuple(trainer.store.resolutions)
        if self.d.latent_pool and self.pool is None and self.cfg.stage == "unet":
            self.pool = self._encode_pool(trainer.acc.device, trainer.acc.is_local_main_process)

    @torch.no_grad()
    def _encode_pool(self, device, show: bool) -> dict[str, Any]:
        """Encode all N items once: q(z|x) mean and std (scaled), annotations, parsing maps (if HOLA needs them)."""
        from tqdm.auto import tqdm
        means, stds, anns, pars = [], [], [], []
        chunk = 256
        for start in tqdm(range(0, self.n, chunk), desc="encoding latent pool", disable=not show):
            raws = [self._raw(i) for i in range(start, min(start + chunk, self.n))]
            post = self.vae.encode(self._pixels([r[0] for r in raws]).to(device, self.vae.dtype)).latent_dist
            means.append(post.mean.float().cpu())
            stds.append(post.std.float().cpu())
            anns += [r[1] for r in raws]
            if self.need_masks:
                pars += [r[2] for r in raws]
        return {"mean": torch.cat(means), "std": torch.cat(stds), "annotation": anns,
                "parsing": pars if self.need_masks else None}

    # ---- a batch
    def batch(self, micro_step: int) -> dict[str, Any]:
        """pos (B,), input_ids (B,77), spans (B,G,2), and pixel_values or pool rows; masks/present when HOLA is on."""
        pos = self.positions(micro_step)
        idx = [self.index(int(p)) for p in pos]
        out: dict[str, Any] = {"pos": pos}
        if self.pool is not None:
            anns = [self.pool["annotation"][i] for i in idx]
            parsings = [self.pool["parsing"][i] for i in idx] if self.need_masks else None
            out["pool_index"] = torch.tensor(idx)
        else:
            raws = [self._raw(i) for i in idx]
            anns, parsings = [r[1] for r in raws], [r[2] for r in raws]
            out["pixel_values"] = self._pixels([r[0] for r in raws])
        if self.cfg.stage == "unet":
            ids, spans = zip(*(self.caption_ids(a, int(p)) for a, p in zip(anns, pos)))
            out["input_ids"] = torch.tensor(ids)
            out["spans"] = torch.tensor(spans).reshape(len(idx), len(self.names), 2)
        if self.need_masks:
            out["masks"], out["present"] = self._masks(parsings)
        return out

    def latents(self, batch: dict) -> torch.Tensor:
        """z_0 = scaling · (mean + std·ε) with ε keyed by sample position (from the pool, or encoding the pixels)."""
        sf = self.vae.config.scaling_factor
        if "pool_index" in batch:
            mean, std = self.pool["mean"][batch["pool_index"]], self.pool["std"][batch["pool_index"]]
        else:
            with torch.no_grad():
                post = self.vae.encode(batch["pixel_values"].to(self.vae.device, self.vae.dtype)).latent_dist
            mean, std = post.mean.float().cpu(), post.std.float().cpu()
        eps = per_sample_randn(self.cfg.seed, batch["pos"], _LATENT, mean.shape[1:])
        return sf * (mean + std * eps)

    @torch.no_grad()
    def calibrate_vae_scaling(self, vae, device, n: int = 512) -> dict[str, float]:
        """Set the VAE's scaling_factor to 1/std of its latents (SD's convention: unit-variance z_0), and measure
        the held-out reconstruction PSNR (people from seeds never trained on). Returns both."""
        from .toyworld import render
        if self.folder is not None:
            imgs = [self.folder[i].image for i in range(min(n, len(self.folder)))]
        else:
            imgs = [render(10 ** 9 + i, size=self.size).image for i in range(n)]
        x = self._pixels(imgs).to(device)
        vae.eval()
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample.clamp(-1, 1)
        mse = F.mse_loss(rec.float(), x).item()
        scaling = 1.0 / post.mean.float().std().item()
        vae.register_to_config(scaling_factor=scaling)
        return {"scaling_factor": scaling, "heldout_psnr_db": 10 * math.log10(4.0 / mse), "heldout_images": len(imgs)}


# ----------------------------------------------------------------------------------------------- LoRA files

def save_lora(unet, folder: str | Path, lora: LoraSection, sdxl: bool = False) -> Path:
    """The UNet's LoRA in diffusers' format: `StableDiffusion(XL)Pipeline.load_lora_weights(folder)` reads it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    meta = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": list(lora.targets)}
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    folder = Path(folder)
    cls.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=meta, safe_serialization=True)
    return folder


def export_lora(lora_dir: str | Path, out: str | Path, format: str = "kohya") -> Path:
    """Convert a diffusers-format LoRA folder to the kohya format AUTOMATIC1111/ComfyUI read (diffusers' converters).

    diffusers -> PEFT (convert_unet_state_dict_to_peft) -> kohya (convert_state_dict_to_kohya). The kohya `alpha`
    entries are set from the adapter's own lora_alpha (the converter writes alpha = rank, i.e. scale 1).
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import save_file
    if format != "kohya":
        raise ValueError(f"format={format!r}: only 'kohya' is supported (diffusers' own format is the input)")
    src = Path(lora_dir)
    src = src / LORA_WEIGHTS if src.is_dir() else src
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no LoRA weights there; pass the folder a training run wrote (OUTPUT/lora)")
    with safe_open(str(src), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    if any(not k.startswith("unet.") for k in state):
        raise ValueError(f"{src}: only UNet LoRAs are exported (keys 'unet.*'); this file has others")
    kohya = convert_state_dict_to_kohya(convert_unet_state_dict_to_peft(state))
    alpha = None
    raw_meta = meta.get("lora_adapter_metadata")
    if raw_meta:
        info = json.loads(raw_meta)
        alpha = info.get("unet.lora_alpha", info.get("lora_alpha")) if isinstance(info, dict) else None
    if alpha is not None:
        for k in kohya:
            if k.endswith(".alpha"):
                kohya[k] = torch.tensor(float(alpha))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out), metadata={"format": "pt"})
    return out


# ----------------------------------------------------------------------------------------------- entry points

def train(config: str | Path | TrainConfig | Mapping, max_steps: int | None = None, output: str | Path | None = None,
          resume: bool = False, **overrides) -> dict:
    """Run one training config (see the module docstring); returns the last logged row (step, losses, s/step)."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, **overrides)
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps={max_steps}: must be >= 1")
    trainer = Trainer(cfg, output)
    return trainer.run(max_steps=max_steps, resume=resume)


def run_cli(args: argparse.Namespace) -> int:
    import yaml
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set run.batch_size=8")
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    result = train(args.config, max_steps=args.max_steps, output=args.output, resume=args.resume, **overrides)
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cosmiclite.train --config FILE ...` = `cosmiclite train ...` (so `accelerate launch -m
    cosmiclite.train` and `torchrun -m cosmiclite.train` work)."""
    from .cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
