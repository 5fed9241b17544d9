"""The Stable Diffusion backbone CosmicMan builds on (Sec. 4.1), built from configs or loaded from weights.

CosmicMan-SD and CosmicMan-SDXL are Stable Diffusion 1.5 / SDXL with a fine-tuned UNet: VAE E, a CLIP
text encoder producing the keys K of Eq. 2, and a denoising UNet eps_theta(z_t, t, c) (Eq. 1). This module
gives the kit three sizes of that same architecture, all as stock diffusers/transformers classes:

    "toy"        64x64 images, VAE 64 -> 16 (x4), UNet (32, 64, 128) with cross-attention at 16, 8, 4,
                 CLIPTextModel width 128 x 2 layers: ~3.2 M UNet parameters, trainable on a 2-core CPU.
    "sd15"       Stable Diffusion 1.5's architecture (UNet 860 M params, CLIP ViT-L/14 text encoder).
    "sdxl"       SDXL base's architecture (UNet 2.6 B params, two text encoders).
    "tiny-sd15", "tiny-sdxl"   the same block layouts shrunk to a few hundred thousand parameters, for tests.

`build_components(arch)` gives random weights (tests, benchmarks, the untrained toy model the training code
starts from); `load_pipeline(path_or_id)` loads real weights; `load_toy_pipeline()` loads the toy model the kit
ships, trained by `cosmiclite.train` (see TOY_MODEL_DIR).

CosmicMan's released weights are a UNet only (hub repos cosmicman/CosmicMan-SD and cosmicman/CosmicMan-SDXL hold
`config.json` + `diffusion_pytorch_model.safetensors`): `load_pipeline(BASE, unet=COSMICMAN)` puts it over the
base pipeline it was fine-tuned from.

But: no refiner for SDXL, no safety checker (the kit makes pictures of toy people), and no download: this
machine and CI are offline, so a missing checkpoint raises `WeightsNotFoundError` saying what to fetch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .protocol import ASSETS

# Where the kit's trained toy model lives, in diffusers' pipeline layout (model_index.json, unet/, vae/, ...).
TOY_MODEL_DIR = ASSETS / "toy_model"

# Hub ids of the checkpoints the kit knows by a short name. CosmicMan's are UNet-only and name their base.
KNOWN_CHECKPOINTS: dict[str, dict[str, str]] = {
    "sd15": {"repo": "stable-diffusion-v1-5/stable-diffusion-v1-5", "family": "sd"},
    "sdxl": {"repo": "stabilityai/stable-diffusion-xl-base-1.0", "family": "sdxl"},
    "cosmicman-sd": {"repo": "cosmicman/CosmicMan-SD", "family": "sd", "base": "sd15", "unet_only": "1"},
    "cosmicman-sdxl": {"repo": "cosmicman/CosmicMan-SDXL", "family": "sdxl", "base": "sdxl", "unet_only": "1"},
}


class WeightsNotFoundError(FileNotFoundError):
    """Raised when a checkpoint is neither a local folder nor in the local Hugging Face cache."""


@dataclass(frozen=True)
class Architecture:
    """Configs of one SD-shaped model: everything `build_components` needs, written out (no download)."""
    name: str
    family: str  # "sd" (one text encoder) or "sdxl" (two, plus size/crop conditioning)
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        """Default image side in pixels: latent side times the VAE's downsampling factor."""
        return self.unet["sample_size"] * 2 ** (len(self.vae["block_out_channels"]) - 1)


# SD 1.5's noise schedule (scaled_linear betas); DDIM with clip_sample=False, as the SD pipelines ship it.
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
# The toy model's schedule: cosine (squaredcos_cap_v2), which suits 16x16 latents better than scaled_linear.
# Pitfall: a DDIM made from a squaredcos DDPM config inherits clip_sample=True and gives washed-out
# samples, so clip_sample=False is written out here.
_TOY_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

_CLIP_VOCAB = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                   pad_token_id=49407)


def _sd_unet(channels, cross_dim, heads, layers=2, groups=32, sample=64) -> dict[str, Any]:
    n = len(channels)
    return dict(sample_size=sample, in_channels=4, out_channels=4, layers_per_block=layers,
                block_out_channels=tuple(channels), norm_num_groups=groups, cross_attention_dim=cross_dim,
                attention_head_dim=heads,  # diffusers' legacy name: for SD 1.x this is the number of heads
                down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))


def _sdxl_unet(channels, cross_dim, head_dims, transformer_layers, text_embed_dim, time_dim=256, groups=32,
               sample=128) -> dict[str, Any]:
    return dict(sample_size=sample, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=tuple(channels), norm_num_groups=groups, cross_attention_dim=cross_dim,
                attention_head_dim=tuple(head_dims), transformer_layers_per_block=tuple(transformer_layers),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                # pooled text embedding (text_encoder_2's projection) + 6 size/crop numbers x time_dim
                projection_class_embeddings_input_dim=text_embed_dim + 6 * time_dim,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def _vae(channels, layers=2, groups=32, sample=512, scaling=0.18215) -> dict[str, Any]:
    n = len(channels)
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels),
                layers_per_block=layers, norm_num_groups=groups, sample_size=sample, scaling_factor=scaling,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


def _clip(hidden, layers, heads, intermediate, projection=None, act="quick_gelu") -> dict[str, Any]:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=intermediate, projection_dim=projection or hidden, hidden_act=act, **_CLIP_VOCAB)


ARCHITECTURES: dict[str, Architecture] = {
    # The recipe that learned to follow prompts on CPU (docs/results.md): UNet 3.22 M, VAE 0.95 M params.
    "toy": Architecture(
        "toy", "sd",
        unet=_sd_unet((32, 64, 128), cross_dim=128, heads=8, layers=1, sample=16),
        vae=_vae((32, 64, 64), layers=1, sample=64),
        text_encoder=_clip(128, 2, 4, 512),
        scheduler=_TOY_SCHEDULE),
    # runwayml/stable-diffusion-v1-5's model configs.
    "sd15": Architecture(
        "sd15", "sd",
        unet=_sd_unet((320, 640, 1280, 1280), cross_dim=768, heads=8),
        vae=_vae((128, 256, 512, 512)),
        text_encoder=_clip(768, 12, 12, 3072),
        scheduler=_SD_SCHEDULE),
    # stabilityai/stable-diffusion-xl-base-1.0's model configs (CLIP ViT-L + OpenCLIP ViT-bigG).
    "sdxl": Architecture(
        "sdxl", "sdxl",
        unet=_sdxl_unet((320, 640, 1280), cross_dim=2048, head_dims=(5, 10, 20), transformer_layers=(1, 2, 10),
                        text_embed_dim=1280),
        vae=_vae((128, 256, 512, 512), sample=1024, scaling=0.13025),
        text_encoder=_clip(768, 12, 12, 3072),
        text_encoder_2=_clip(1280, 32, 20, 5120, projection=1280, act="gelu"),
        scheduler=_SD_SCHEDULE),
    # Tiny versions of the two block layouts, for tests: same classes and code paths, 32x32 latents.
    "tiny-sd15": Architecture(
        "tiny-sd15", "sd",
        unet=_sd_unet((32, 64), cross_dim=32, heads=2, layers=1, sample=16),
        vae=_vae((32, 32), layers=1, sample=32),
        text_encoder=_clip(32, 1, 2, 64),
        scheduler=_SD_SCHEDULE),
    "tiny-sdxl": Architecture(
        "tiny-sdxl", "sdxl",
        unet=_sdxl_unet((32, 64, 64), cross_dim=64, head_dims=(2, 4, 4), transformer_layers=(1, 1, 2),
                        text_embed_dim=32, time_dim=8, sample=16),
        vae=_vae((32, 32), layers=1, sample=32),
        text_encoder=_clip(32, 1, 2, 64),
        text_encoder_2=_clip(32, 1, 2, 64, projection=32, act="gelu"),
        scheduler=_SD_SCHEDULE),
}


def architecture(arch: str | Architecture) -> Architecture:
    """Look an architecture up by name; raises ValueError listing the known names."""
    if isinstance(arch, Architecture):
        return arch
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is unknown; use one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def build_unet(arch: str | Architecture = "toy", seed: int = 0):
    """A randomly initialised `UNet2DConditionModel` of the given architecture (seeded, reproducible)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**architecture(arch).unet)


def build_vae(arch: str | Architecture = "toy", seed: int = 0):
    """A randomly initialised `AutoencoderKL` of the given architecture."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(**architecture(arch).vae)


def build_text_encoder(arch: str | Architecture = "toy", seed: int = 0, second: bool = False):
    """A randomly initialised CLIP text encoder (SDXL's second one, with projection, when `second`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    a = architecture(arch)
    cfg = a.text_encoder_2 if second else a.text_encoder
    if cfg is None:
        raise ValueError(f"arch={a.name!r} has a single text encoder; second=True is only for SDXL-shaped ones")
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if second else CLIPTextModel
    return cls(CLIPTextConfig(**cfg)).eval()


def build_scheduler(arch: str | Architecture = "toy", kind: str = "ddim"):
    """The sampling scheduler ("ddim", clip_sample=False) or the training one ("ddpm") on the arch's schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler
    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if kind not in classes:
        raise ValueError(f"kind={kind!r} is unknown; use 'ddim' (sampling) or 'ddpm' (training)")
    return classes[kind].from_config(architecture(arch).scheduler)  # from_config drops keys a class lacks


def training_scheduler(scheduler):
    """A `DDPMScheduler` with the same noise schedule as `scheduler` (for `add_noise` in training, Eq. 1)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(scheduler.config, clip_sample=False)


def build_components(arch: str | Architecture = "toy", seed: int = 0) -> dict[str, Any]:
    """All components of a pipeline with random weights, keyed as the pipeline class's constructor wants.

    SD-family archs give dict(unet, vae, text_encoder, tokenizer, scheduler); SDXL-family ones add
    text_encoder_2 and tokenizer_2. The tokenizer is the real CLIP BPE (`cosmiclite.tokenizer`), so token ids
    and the group spans of Sec. 4.2 are those a real checkpoint would see.
    """
    from .tokenizer import clip_tokenizer, sdxl_tokenizers
    a = architecture(arch)
    parts: dict[str, Any] = dict(unet=build_unet(a, seed), vae=build_vae(a, seed + 1),
                                 text_encoder=build_text_encoder(a, seed + 2), scheduler=build_scheduler(a))
    if a.family == "sdxl":
        parts["tokenizer"], parts["tokenizer_2"] = sdxl_tokenizers()
        parts["text_encoder_2"] = build_text_encoder(a, seed + 3, second=True)
    else:
        parts["tokenizer"] = clip_tokenizer()
    return parts


def toy_components(seed: int = 0) -> dict[str, Any]:
    """The toy model's components with random weights: dict(unet, vae, text_encoder, tokenizer, scheduler).

    `StableDiffusionPipeline(**toy_components(), safety_checker=None, feature_extractor=None,
    requires_safety_checker=False)` samples 64x64 images from 4x16x16 latents; `training_scheduler(scheduler)`
    gives the DDPM view of the same noise schedule for training.
    """
    return build_components("toy", seed)


def pipeline_from_components(components: dict[str, Any]):
    """Wrap components in `StableDiffusionPipeline` or, when there is a text_encoder_2, the XL pipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if "text_encoder_2" in components:
        return StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_pipeline(arch: str | Architecture = "toy", seed: int = 0):
    """A whole pipeline of the given architecture with random weights (progress bar off: it is for tests)."""
    pipe = pipeline_from_components(build_components(arch, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe_or_components, folder: str | Path) -> Path:
    """Save a pipeline (or a components dict) in diffusers' folder layout, weights as safetensors."""
    pipe = pipe_or_components
    if isinstance(pipe, dict):
        pipe = pipeline_from_components(pipe)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ----------------------------------------------------------------------------------------- loading real weights

def _download_hint(repo: str, folder: str) -> str:
    return (f"  huggingface-cli download {repo} --local-dir {folder}\n"
            f"(or `hf download {repo} --local-dir {folder}`) on a machine with internet, copy the folder here, "
            f"and pass the folder path instead of the hub id")


def _resolve(path_or_id: str | Path, what: str, marker_files: tuple[str, ...]) -> Path:
    """A local folder as is; a hub id only if it is complete in the local cache (this kit never downloads)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not any((p / m).exists() for m in marker_files):
            raise WeightsNotFoundError(
                f"{what}: folder {p} has none of {list(marker_files)}; it must be in diffusers layout (as written "
                f"by save_pretrained or `huggingface-cli download`)")
        return p
    repo = str(path_or_id)
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise WeightsNotFoundError(f"{what}: {path_or_id!r} is neither an existing folder nor a hub id "
                                   f"(owner/name); known short names: {sorted(KNOWN_CHECKPOINTS)}")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError and friends: not in the cache
        raise WeightsNotFoundError(
            f"{what}: {repo!r} is not a local folder and not in the Hugging Face cache, and this kit never "
            f"downloads. Fetch it with\n{_download_hint(repo, './weights/' + repo.split('/')[-1])}") from err


def load_unet(path_or_id: str | Path, torch_dtype=None):
    """A UNet alone, e.g. CosmicMan's released weights (config.json at the folder root, or in unet/)."""
    from diffusers import UNet2DConditionModel
    name = KNOWN_CHECKPOINTS.get(str(path_or_id), {}).get("repo", path_or_id)
    root = _resolve(name, "UNet", ("config.json", "unet/config.json"))
    sub = None if (root / "config.json").exists() else "unet"
    return UNet2DConditionModel.from_pretrained(root, subfolder=sub, torch_dtype=torch_dtype, use_safetensors=True)


def load_pipeline(path_or_id: str | Path, unet: str | Path | None = None, torch_dtype=None, device=None):
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline from a local folder or the local hub cache.

    path_or_id: a folder in diffusers layout, a hub id (owner/name, must already be cached), or a short name
        from KNOWN_CHECKPOINTS ("sd15", "sdxl", "cosmicman-sd", "cosmicman-sdxl"; CosmicMan's names load their
        base pipeline with CosmicMan's UNet over it).
    unet: a UNet-only checkpoint (folder or hub id) to put over the base's UNet, as CosmicMan's weights are used.
    The pipeline class (SD or SDXL) is read from model_index.json. Safety checker off; weights safetensors only.
    Raises WeightsNotFoundError with the download command when the weights are not on this machine.
    """
    from diffusers import DiffusionPipeline
    known = KNOWN_CHECKPOINTS.get(str(path_or_id))
    if known and known.get("unet_only"):
        unet = unet or known["repo"]
        known = KNOWN_CHECKPOINTS[known["base"]]
    name = known["repo"] if known else path_or_id
    root = _resolve(name, "pipeline", ("model_index.json",))
    kwargs: dict[str, Any] = dict(torch_dtype=torch_dtype, use_safetensors=True)
    if unet is not None:
        kwargs["unet"] = load_unet(unet, torch_dtype=torch_dtype)
    cls_name = json.loads((root / "model_index.json").read_text())["_class_name"]
    if cls_name == "StableDiffusionPipeline":  # the SD pipeline alone has a safety checker to switch off
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(root, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def load_toy_pipeline(folder: str | Path | None = None, device=None):
    """The kit's trained toy model (TOY_MODEL_DIR) as a StableDiffusionPipeline with a DDIM scheduler.

    Raises WeightsNotFoundError when the toy model has not been trained/shipped yet, with how to make one.
    """
    folder = Path(folder) if folder is not None else TOY_MODEL_DIR
    if not (folder / "model_index.json").exists():
        raise WeightsNotFoundError(
            f"toy model: no trained toy model at {folder} (model_index.json missing). Train one with the kit's "
            f"training code (`cosmiclite.train`, see the README), which writes it there, or pass --model PATH to "
            f"a pipeline folder (e.g. one written by cosmiclite.models.save_pipeline(toy_components(), PATH)).")
    # fp32 compute whatever the folder stores (toy models trained with model.text_encoder_fp16 keep it in fp16)
    return load_pipeline(folder, torch_dtype=torch.float32, device=device)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of a module (the sizes quoted in the docstring come from this)."""
    return sum(p.numel() for p in module.parameters())

