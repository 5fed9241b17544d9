"""The training config: one YAML file per run (configs/), read into dataclasses and checked before training.

`load_config(path_or_dict, **dotted_overrides)` reads it, refuses unknown keys (naming the key path and the known
keys) and runs `check_config`, which raises `ConfigError` for everything that can be known to fail before the first
step, so the loop itself never fails on config.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..data import read_metadata
from ..hola import HolaConfig
from ..models import ARCHITECTURES

__all__ = ["ConfigError", "TrainConfig", "ModelSection", "CaptionSection", "DataSection", "LoraSection",
           "OptimSection", "EmaSection", "ValidationSection", "RunSection", "load_config", "check_config"]


class ConfigError(ValueError):
    """A training config the trainer refuses, raised before any training starts; names the field and the fix."""


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
                 instead of rendering and encoding (saves the rendering and encoding of every step: docs/results.md,
                 Speed); needs a finite dataset (toy: num_samples).
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


def check_config(cfg: TrainConfig) -> TrainConfig:
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
            raise ConfigError("lora.targets is empty: name the UNet modules to adapt, "
                              "e.g. [to_q, to_k, to_v, to_out.0]")
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
        if d.mask_sizes is not None and isinstance(cfg.hola.resolutions, tuple):
            missing = [s for s in cfg.hola.resolutions if s not in d.mask_sizes]
            if missing:
                raise ConfigError(f"data.mask_sizes={d.mask_sizes} lacks the HOLA resolutions {missing}")
    if cfg.optim.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401, PLC0415  (optional, CUDA only: checked here, used by the optimizer)
        except ImportError:
            raise ConfigError("optim.use_8bit_adam is true but bitsandbytes is not installed: "
                              "`pip install bitsandbytes` (CUDA) or set optim.use_8bit_adam: false") from None
    if cfg.stage == "vae" and cfg.model.pretrained is not None:
        raise ConfigError("stage=vae trains an autoencoder from scratch: set model.pretrained: null")
    if cfg.model.pretrained is None and cfg.model.arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch={cfg.model.arch!r}: use one of {sorted(ARCHITECTURES)}")
    return cfg


def _data_has_masks(d: DataSection) -> bool:
    if d.source == "toy":
        return True  # the toy world draws its parsing map with every person
    try:
        rows = read_metadata(Path(d.path).expanduser())
    except FileNotFoundError:
        raise ConfigError(f"data.path={d.path!r} has no metadata.jsonl: not a dataset folder written by "
                          "cosmiclite.data "
                          "(make one with `cosmiclite toyworld --n 1000 --out DIR`)") from None
    return bool(rows) and all(isinstance(r, dict) and r.get("parsing_file_name") for _, r in rows)


def load_config(path: str | Path | Mapping, **overrides) -> TrainConfig:
    """Read a YAML config (or a dict), apply dotted overrides (`run.max_steps=5`), validate. Raises ConfigError."""
    if isinstance(path, Mapping):
        raw = dict(path)
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist "
                              "(presets live in configs/, e.g. configs/toy_lora.yaml)")
        raw = yaml.safe_load(p.read_text()) or {}
    raw = json.loads(json.dumps(raw))  # a deep copy
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {}) if node.get(k) is not None else node.setdefault(k, {}) or {}
        node[last] = value
    return check_config(_build(TrainConfig, raw, "config"))
