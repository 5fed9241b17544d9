"""Setting up a run: the frozen conditioning, the module that trains and its parameters, the optimizer and LR
schedule, DeepSpeed's config, the EMA. `Trainer` calls these; each takes what it needs, not the trainer."""
from __future__ import annotations

import math

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from peft import LoraConfig

from ..scaling import global_batch
from .config import ConfigError, TrainConfig

__all__ = ["freeze_conditioning", "captured_sides", "prepare_trainable", "trainable_parameters", "make_optimizer",
           "fill_deepspeed_config", "make_ema"]


def freeze_conditioning(comps: dict, device, weight_dtype: torch.dtype) -> None:
    """The VAE and text encoder(s) frozen, in eval mode, on the device, in the training dtype (the VAE stays fp32 on
    the CPU)."""
    for k in ("vae", "text_encoder", "text_encoder_2"):
        if k in comps:
            comps[k].requires_grad_(False).eval().to(device)
            if weight_dtype != torch.float32 and not (k == "vae" and device.type == "cpu"):
                comps[k].to(dtype=weight_dtype)


def captured_sides(components: dict, image_size: int) -> list[int]:
    """Map sides of the UNet's cross-attention layers at this image size (one dry shape walk, no forward)."""
    unet = components["unet"]
    latent = image_size // 2 ** (len(components["vae"].config.block_out_channels) - 1)
    sides, s = [], latent
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sides.append(s)
        if block.downsamplers is not None:
            s = math.ceil(s / 2)
    if getattr(unet.mid_block, "has_cross_attention", False):
        sides.append(s)
    return sorted(set(sides))


def prepare_trainable(cfg: TrainConfig, components: dict, device, weight_dtype: torch.dtype) -> torch.nn.Module:
    """The module the optimizer trains, with requires_grad set on exactly its trainable parameters: the VAE (stage
    vae), the UNet's LoRA adapter, or the whole UNet."""
    if cfg.stage == "vae":
        vae = components["vae"].to(device)
        vae.requires_grad_(True).train()
        return vae
    unet = components["unet"]
    if cfg.lora is not None:
        unet.requires_grad_(False).to(device)
        if weight_dtype != torch.float32:   # the frozen base in half precision, the adapter in fp32
            unet.to(dtype=weight_dtype)
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
        unet.requires_grad_(True).to(device)
    unet.train()
    if cfg.run.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer steps and the gradient clipping measures: the one place trainable weights are chosen."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], world: int):
    """AdamW (8-bit when asked) over params and the LR schedule, counted in optimizer steps."""
    o, r = cfg.optim, cfg.run
    lr = o.lr * (global_batch(r.batch_size, world, r.grad_accum) if o.scale_lr else 1)
    if o.use_8bit_adam:
        import bitsandbytes as bnb  # noqa: PLC0415  (optional, CUDA only; check_config checked it is installed)
        opt_cls = bnb.optim.AdamW8bit
    else:
        opt_cls = torch.optim.AdamW
    opt = opt_cls(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    # counted in optimizer steps: the loop steps it once per optimizer step (step_scheduler_with_optimizer=False)
    sched = get_scheduler(o.lr_scheduler, opt, num_warmup_steps=o.warmup_steps, num_training_steps=r.max_steps)
    return opt, sched


def fill_deepspeed_config(ds: dict, cfg: TrainConfig, world: int) -> None:
    """DeepSpeed reads batch, accumulation and clipping from its own config: fill them from the cosmiclite config
    (no dataloader is prepared, so accelerate cannot infer the micro-batch)."""
    r = cfg.run
    ds["train_micro_batch_size_per_gpu"] = r.batch_size
    ds["gradient_accumulation_steps"] = r.grad_accum
    ds["train_batch_size"] = global_batch(r.batch_size, world, r.grad_accum)
    ds["gradient_clipping"] = float(cfg.optim.max_grad_norm or 0.0)
    if cfg.optim.use_8bit_adam:
        ds["zero_allow_untested_optimizer"] = True


def make_ema(cfg: TrainConfig, unet) -> EMAModel:
    """diffusers' EMAModel of the UNet's weights (fp32 shadow copies on the training device)."""
    e = cfg.ema
    return EMAModel(list(unet.parameters()), decay=e.decay, update_after_step=e.update_after_step,
                    use_ema_warmup=e.use_ema_warmup, inv_gamma=e.inv_gamma, power=e.power,
                    model_cls=type(unet), model_config=unet.config)
