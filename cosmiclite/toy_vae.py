"""The toy model's autoencoder stage: what `stage: vae` trains (configs/toy_vae.yaml), for a from-scratch base model.

    L = MSE(D(z), x) + kl_weight · KL(q(z|x) ‖ N(0, I)),   z ~ q(z|x)

then SD's convention for the latents: scaling_factor = 1 / std of E(x), so that z_0 has unit variance.
The architecture itself is `cosmiclite.models.build_vae`; the loop is `cosmiclite.train`'s.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import to_pixels

__all__ = ["vae_loss", "calibrate_vae_scaling"]


def vae_loss(vae, x: torch.Tensor, normal: Callable[[Sequence[int]], torch.Tensor], kl_weight: float,
             autocast=None) -> dict[str, torch.Tensor]:
    """The loss above on pixels x (B, 3, H, W) in [-1, 1]; normal(latent shape) draws the (B, *shape) ε of
    z = mean + std·ε (training keys it by sample position)."""
    with autocast if autocast is not None else nullcontext():
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean + post.std * normal(post.mean.shape[1:]).to(x.device)).sample
    mse = F.mse_loss(rec.float(), x)
    kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1 - post.logvar.float()).mean()
    psnr = 10 * torch.log10(4.0 / mse.detach())      # images in [-1, 1]: peak-to-peak 2
    return {"loss": mse + kl_weight * kl, "mse": mse, "kl": kl, "psnr": psnr}


@torch.no_grad()
def calibrate_vae_scaling(vae, images: Sequence[np.ndarray], device) -> dict[str, float]:
    """Set the VAE's scaling_factor to 1/std of its latents (SD's convention: unit-variance z_0), and measure the
    reconstruction PSNR on `images` (held out: never trained on). Returns both."""
    x = to_pixels(list(images)).to(device)
    vae.eval()
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mean).sample.clamp(-1, 1)
    mse = F.mse_loss(rec.float(), x).item()
    scaling = 1.0 / post.mean.float().std().item()
    vae.register_to_config(scaling_factor=scaling)
    return {"scaling_factor": scaling, "heldout_psnr_db": 10 * math.log10(4.0 / mse), "heldout_images": len(images)}
