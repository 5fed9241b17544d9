"""What a run leaves behind, in the formats other tools read: a LoRA in diffusers' format (and kohya's, for
AUTOMATIC1111 / ComfyUI), and a full fine-tune as a diffusers pipeline folder (also from any complete checkpoint)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..models import save_pipeline
from .checkpoints import list_checkpoints
from .components import load_components
from .config import ConfigError, LoraSection, TrainConfig, load_config

__all__ = ["LORA_WEIGHTS", "save_lora", "export_lora", "save_full_pipeline", "export_pipeline"]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def save_lora(unet, folder: str | Path, lora: LoraSection, sdxl: bool = False) -> Path:
    """The UNet's LoRA in diffusers' format: `StableDiffusion(XL)Pipeline.load_lora_weights(folder)` reads it."""
    # lazy: diffusers' pipeline classes pull in transformers' image processors (seconds of start-up, and a
    # torchvision warning) that nothing else of a training run needs
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: PLC0415
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


def save_full_pipeline(cfg: TrainConfig, components: dict, unet, folder: str | Path) -> Path:
    """A full fine-tune's UNet with the run's other components as a diffusers pipeline folder, with the run's
    config beside it as train_config.yaml (the text encoders in fp16 when `model.text_encoder_fp16`)."""
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
