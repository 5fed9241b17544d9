"""The model components a training run starts from, and τ(c), the text conditioning of a step."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .. import models
from .config import ConfigError, TrainConfig

__all__ = ["load_components", "text_embeddings"]


def load_components(cfg: TrainConfig) -> dict:
    """The model components a config starts from, on the CPU in fp32 (`stage: vae`: the VAE alone).

    `model.pretrained` null builds `model.arch` with seeded random weights; "toy" loads the shipped toy model;
    anything else goes to `models.load_pipeline`. `model.vae` swaps in a trained AutoencoderKL, and
    `model.text_encoder_fp16` rounds the frozen text encoder(s) to the fp16 values that will be saved.
    """
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
        vae_dir = Path(m.vae).expanduser()
        if not (vae_dir / "config.json").is_file():
            raise ConfigError(f"model.vae={m.vae!r} holds no AutoencoderKL (config.json missing): train one "
                              "with a `stage: vae` config first (it writes OUTPUT/vae)")
        comps["vae"] = AutoencoderKL.from_pretrained(vae_dir)
    return {k: v for k, v in comps.items() if v is not None}


def text_embeddings(components: dict, input_ids: torch.Tensor, image_size: int, device, dtype):
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
