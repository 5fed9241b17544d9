"""Scaling out (CosmicMan trains on a node of GPUs): the global batch and the memory per GPU of a full fine-tune
under DDP, DeepSpeed ZeRO-2 and FSDP, COMPUTED from parameter counts and a forward on the meta device.

    global batch = run.batch_size (per process) x processes x run.grad_accum

`memory_estimate` follows the ZeRO paper's accounting (Rajbhandari et al. 2020); `memory_table` fills it in for
an architecture of `cosmiclite.models` ("sd15", "sdxl"), with `fsdp_unit_params` and `activation_estimate` read
off a UNet built on the meta device (no memory, no arithmetic). docs/results.md (Scaling out) and notebook 07 show the
tables; `cosmiclite.train` runs the modes.

But: these are estimates, not measurements; the CUDA allocator's fragmentation and cuDNN/cuBLAS workspaces are
not in them (one measured point for comparison: benchmarks/hola_overhead.py on an H100).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from diffusers import UNet2DConditionModel

from .models import architecture

__all__ = ["global_batch", "MemoryEstimate", "memory_estimate", "memory_table", "fsdp_unit_params",
           "activation_estimate"]


def global_batch(batch_size: int, processes: int = 1, grad_accum: int = 1) -> int:
    """Samples per optimizer step: per-process batch × processes × gradient-accumulation steps."""
    return batch_size * processes * grad_accum


MODES = ("ddp", "zero2", "fsdp")
GiB = 2 ** 30


@dataclass
class MemoryEstimate:
    """Bytes per GPU of one training mode, COMPUTED from parameter counts (not measured). See `memory_estimate`."""
    mode: str
    n_gpus: int
    n_params: int
    weights: float
    weights_compute: float        # bf16/fp16 copies used by the matmuls (autocast / FSDP's gathered units)
    grads: float
    optimizer: float              # AdamW exp_avg + exp_avg_sq (+ DeepSpeed's fp32 master copy)
    ema: float
    buffers: float                # communication buckets (DeepSpeed's default reduce/all-gather buckets)
    activations: float

    @property
    def total(self) -> float:
        return (self.weights + self.weights_compute + self.grads + self.optimizer + self.ema + self.buffers
                + self.activations)

    def gib(self) -> dict[str, Any]:
        keys = ("weights", "weights_compute", "grads", "optimizer", "ema", "buffers", "activations", "total")
        return {"mode": self.mode, "n_gpus": self.n_gpus, **{k: round(getattr(self, k) / GiB, 2) for k in keys}}


def memory_estimate(n_params: int, n_gpus: int = 1, mode: str = "ddp", mixed_precision: str = "bf16",
                    ema: bool = False, activation_bytes: float = 0.0, unit_params: int = 0,
                    bucket_elements: int = 500_000_000) -> MemoryEstimate:
    """Training memory per GPU for a full fine-tune with AdamW (computed, ZeRO paper's accounting, Rajbhandari
    et al. 2020), P = n_params, N = n_gpus, half = 2 bytes under bf16/fp16 mixed precision:

      ddp    every GPU holds everything: fp32 weights 4P, fp32 grads 4P (DDP's buckets are the grads:
             gradient_as_bucket_view), Adam 8P; autocast keeps a half copy of the weights for backward (2P).
      zero2  DeepSpeed ZeRO-2: half weights 2P replicated; half grads 2P/N and fp32 master + Adam 12P/N sharded
             (fp32 training: weights 4P, grads 4P/N, Adam 8P/N); plus DeepSpeed's reduce and all-gather buckets
             (bucket_elements each, its default 5e8, at most P).
      fsdp   FULL_SHARD: fp32 weights, grads and Adam all sharded, 16P/N; plus the units gathered at once in the
             compute dtype (unit_params: the root unit + the two largest wrapped blocks, see `fsdp_unit_params`)
             and their unsharded grads.
    ema: one more fp32 copy (4P) on every GPU (DDP, ZeRO-2; not supported under FSDP).
    activation_bytes: the per-GPU activations (`activation_estimate`); they do not shrink with N.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision={mixed_precision!r}: use no, fp16 or bf16")
    if n_gpus < 1 or n_params < 1:
        raise ValueError(f"n_gpus={n_gpus}, n_params={n_params}: both must be >= 1")
    P, N = float(n_params), float(n_gpus)
    half = 2.0 if mixed_precision != "no" else 0.0
    c = 2.0 if half else 4.0                         # bytes of a weight as the matmuls see it
    buffers, compute = 0.0, 0.0
    if mode == "ddp":
        weights, compute, grads, optim = 4 * P, half * P, 4 * P, 8 * P
    elif mode == "zero2":
        weights = c * P
        grads = c * P / N
        optim = (12 if half else 8) * P / N
        buffers = 2 * min(P, bucket_elements) * c
    else:
        if unit_params <= 0:
            raise ValueError("mode='fsdp' needs unit_params (the parameters gathered at once): "
                             "fsdp_unit_params(unet) computes it for a UNet")
        weights, grads, optim = 4 * P / N, 4 * P / N, 8 * P / N
        compute = 2 * c * unit_params                 # gathered weights + their unsharded grads
        if ema:
            raise ValueError("ema under FSDP is not supported by the trainer (sharded weights): use ddp or zero2")
    return MemoryEstimate(mode, n_gpus, n_params, weights, compute, grads, optim, 4 * P if ema else 0.0, buffers,
                          float(activation_bytes))


def memory_table(arch: str = "sd15", n_gpus: Sequence[int] = (1, 8), batch_size: int = 1, image_size: int | None = None,
                 mixed_precision: str = "bf16", gradient_checkpointing: bool = True, ema: bool = False) -> list[dict]:
    """Rows of `memory_estimate` (GiB per GPU, computed) for an architecture of cosmiclite.models (e.g. "sd15",
    "sdxl") in every mode and GPU count, with its parameter count, FSDP units and activations from the meta device."""
    a = architecture(arch)
    size = image_size or a.image_size
    latent = size // 2 ** (len(a.vae["block_out_channels"]) - 1)
    units = fsdp_unit_params(a.unet)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    act = activation_estimate(a.unet, batch_size, latent, dtype, gradient_checkpointing)
    rows = []
    for n in n_gpus:
        for mode in MODES:
            if mode == "fsdp" and ema:
                continue
            e = memory_estimate(units["total"], n, mode, mixed_precision, ema=ema, activation_bytes=act,
                                unit_params=units["gathered"])
            rows.append({"arch": arch, "params_M": round(units["total"] / 1e6, 1), "batch_per_gpu": batch_size,
                         "image_size": size, **e.gib()})
    return rows


def _meta_unet(unet_config: Mapping):
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(unet_config))


def fsdp_unit_params(unet_config: Mapping, wrap: Sequence[str] = ("BasicTransformerBlock", "ResnetBlock2D")) -> dict:
    """Parameters of the FSDP units (configs/accelerate/fsdp.yaml wraps these block classes), from a UNet config on
    the meta device (no memory): total, the root unit's own (not inside a wrapped block), the largest unit, and
    `gathered` = root + 2 × largest (the unit computing and the one prefetched)."""
    unet = _meta_unet(unet_config)
    units = [sum(p.numel() for p in m.parameters()) for m in unet.modules() if type(m).__name__ in wrap]
    # a wrapped block nested in another wrapped block does not occur in diffusers' UNets (blocks are leaves)
    total = sum(p.numel() for p in unet.parameters())
    root = total - sum(units)
    return {"total": total, "root": root, "largest": max(units), "gathered": root + 2 * max(units)}


def activation_estimate(unet_config: Mapping, batch: int, latent_side: int, dtype=torch.bfloat16,
                        gradient_checkpointing: bool = False, text_tokens: int = 77) -> float:
    """Bytes of the tensors a UNet's forward saves for backward (its activations), COMPUTED by running the forward on
    the meta device (shapes only, no memory, no arithmetic) in `dtype` under `saved_tensors_hooks`. Weights saved
    for backward are not counted (they are in `memory_estimate`'s terms). An approximation of the real peak: a
    tensor saved twice counts twice, autocast's fp32 islands (softmax, norms) are counted in `dtype`, and the
    transient workspace of the backward itself is left out."""
    unet = torch.nn.Module.to(_meta_unet(unet_config), dtype)   # (diffusers' .to warns about fp32 modules)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = {id(p) for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if id(t) not in params:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    cfg = unet.config
    x = torch.zeros(batch, cfg.in_channels, latent_side, latent_side, device="meta", dtype=dtype)
    c = torch.zeros(batch, text_tokens, cfg.cross_attention_dim, device="meta", dtype=dtype)
    added = None
    if cfg.addition_embed_type == "text_time":
        n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(batch, n_text, device="meta", dtype=dtype),
                 "time_ids": torch.zeros(batch, 6, device="meta", dtype=dtype)}
    t = torch.zeros(batch, device="meta", dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, c, added_cond_kwargs=added)
    return float(sum(saved.values()))
