"""Cost of HOLA (CosmicMan Sec. 4.3, Eq. 3) in a training step: L_noise + L_HOLA over L_noise alone (Eq. 4).

One training step = UNet forward on noised latents, the loss, backward, AdamW step (what `cosmiclite.train` does
per micro-batch, minus data loading, which is the same for both). Two variants, same model, batch, resolution,
inputs and initial weights, measured in one run:

    noise   L = L_noise                     stock attention processors, no capture
    hola    L = L_noise + L_HOLA            `capture_cross_attention(unet, "training")` at the HOLA resolutions,
                                            `hola_terms` on the captured per-head maps (drop_prob as configured)

They run on twin copies of the model (each with its own optimizer) that alternate step by step, the order
flipping every repetition, so load from other processes hits both alike; the step ratio is the ratio of the
medians (and the median of the paired per-repetition ratios beside it).

    ratio.step_time = median hola step / median noise step                              (target <= 1.10)
    ratio.memory    = CUDA: peak torch.cuda.max_memory_allocated of a hola step / of a noise step (one model
                      resident, weights + optimizer + activations)                       (target <= 1.10)
                      CPU: bytes of the tensors autograd saves for backward (activations, unique storages,
                      parameters excluded) with HOLA / without: torch has no CPU allocator statistics
    lora_hola_batch1_peak_gb (CUDA): peak memory of a LoRA + HOLA step at batch 1 with the text encoder and
                      VAE resident and run (as `cosmiclite train` with configs/sd15_lora.yaml does)  (<= 12 GB)

Setups (random weights: the cost does not depend on the values):
    CPU   toy UNet (3.2 M params), 64 px (16x16 latents), LoRA rank and HOLA as configs/toy_lora.yaml (its map side,
          max-normalised, per head), fp32, batch 8 (--batch), 2 threads (--threads)
    CUDA  SD 1.5 UNet (860 M params), 512 px (64x64 latents), LoRA rank 16 as configs/sd15_lora.yaml, HOLA at
          "1/16" = 32x32, per head, bf16 autocast (frozen base in bf16, LoRA in fp32), gradient checkpointing,
          batch 4

Masks, spans and captions are real: toy-world people (`cosmiclite.data.ToyWorldDataset`) at the image size.

    python benchmarks/hola_overhead.py [--quick] [--device cpu|cuda] [--batch 8] [--threads 2] [--reps N]
                                       [--normalize none|max|sum] [--hola JSON]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from peft import LoraConfig

from cosmiclite.attention import capture_cross_attention
from cosmiclite.data import ToyWorldDataset, collate
from cosmiclite.hola import HolaConfig, daring_loss, hola_terms
from cosmiclite.hola_fused import fused_eq3_bracket
from cosmiclite.models import architecture, build_text_encoder, build_unet, build_vae
from cosmiclite.train import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """One model + optimizer + inputs; `step(hola)` runs one training step and returns its loss terms."""

    def __init__(self, arch: str, image_px: int, batch: int, device: torch.device, lora_rank: int, hola: HolaConfig,
                 bf16: bool, checkpointing: bool, seed: int = 0):
        a = architecture(arch)
        self.device, self.hola, self.bf16 = device, hola, bf16
        self.latent = image_px * a.unet["sample_size"] // a.image_size
        self.image_px = image_px
        unet = build_unet(arch, seed).to(device)
        unet.requires_grad_(False)
        if bf16:
            unet.to(dtype=torch.bfloat16)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
        for p in unet.parameters():        # the adapter in fp32 (as cosmiclite.train does under bf16)
            if p.requires_grad:
                p.data = p.data.float()
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet
        self.opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
        # HOLA's map sides at this image size (the captured ones are the attn2 grids; "1/16" picks one)
        self.sides = hola.sides(self._attn2_sides(), image_px)

        ds = ToyWorldDataset(batch, size=min(image_px, 256), seed=1000, mask_sizes=self.sides)  # masks only
        b = collate([ds[i] for i in range(batch)])
        g = torch.Generator().manual_seed(seed)
        enc = build_text_encoder(arch, seed + 2)
        with torch.no_grad():
            self.states = enc(b["input_ids"])[0].to(device, torch.bfloat16 if bf16 else torch.float32)
        del enc
        self.spans, self.present = b["spans"].to(device), b["present"].to(device)
        self.masks = {k: v.to(device) for k, v in b["masks"].items()}
        self.keep = hola.sample_keep(batch, g, device)
        self.zt = torch.randn(batch, 4, self.latent, self.latent, generator=g).to(device)
        self.noise = torch.randn(batch, 4, self.latent, self.latent, generator=g).to(device)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.batch = batch

    def _attn2_sides(self) -> list[int]:
        """Sides of the cross-attention grids: one no-grad forward at batch 1 inside an inference capture."""
        with torch.no_grad(), capture_cross_attention(self.unet, "inference", resolutions=range(1, 513)) as store:
            x = torch.zeros(1, 4, self.latent, self.latent, device=self.device,
                            dtype=torch.bfloat16 if self.bf16 else torch.float32)
            c = torch.zeros(1, 77, self.unet.config.cross_attention_dim, device=self.device, dtype=x.dtype)
            with self._autocast():
                self.unet(x, 999, c)
        return sorted(store.grids)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def loss(self, store) -> tuple[torch.Tensor, dict]:
        zt = self.zt.to(torch.bfloat16) if self.bf16 else self.zt
        with self._autocast():
            pred = self.unet(zt, self.t, self.states).sample
        noise_loss = F.mse_loss(pred.float(), self.noise)
        if store is None:
            return noise_loss, {"noise_loss": noise_loss.item()}
        terms = hola_terms(store.maps(), self.spans, self.masks, self.present, self.hola,
                           image_size=self.image_px, keep=self.keep, bracket=fused_eq3_bracket)
        loss = daring_loss(noise_loss, terms.loss, self.hola)
        return loss, {"noise_loss": noise_loss.item(), "hola_loss": terms.loss.item()}

    def step(self, store) -> dict:
        loss, logs = self.loss(store)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return logs

    def capture(self):
        return capture_cross_attention(self.unet, "training", resolutions=self.sides, **self.hola.capture_options())


def saved_tensor_bytes(setup: Setup, hola: bool) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward + loss (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in setup.unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with ExitStack() as stack:
        store = stack.enter_context(setup.capture()) if hola else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = setup.loss(store)
    del loss
    setup.opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def cuda_peak(setup: Setup, hola: bool) -> tuple[int, int]:
    """(peak bytes during one step, bytes allocated before it): torch.cuda.max_memory_allocated."""
    with ExitStack() as stack:
        store = stack.enter_context(setup.capture()) if hola else None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        setup.step(store)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), before


def lora_hola_batch1_peak(arch: str, image_px: int, device, hola: HolaConfig) -> dict:
    """Peak CUDA memory of a LoRA + HOLA step at batch 1, text encoder and VAE resident and run in bf16."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    s = Setup(arch, image_px, 1, device, 16, hola, bf16=True, checkpointing=True)
    enc = build_text_encoder(arch, 2).to(device, torch.bfloat16).eval()
    vae = build_vae(arch, 1).to(device, torch.bfloat16).eval()
    ids = torch.randint(0, 49407, (1, 77), device=device)
    px = torch.randn(1, 3, image_px, image_px, device=device, dtype=torch.bfloat16)
    peaks = []
    for _ in range(2):                       # the second step has AdamW's state allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            enc(ids)
            _ = vae.encode(px).latent_dist.mean
        with s.capture() as store:
            s.step(store)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    out = {"lora_hola_batch1_peak_gb": round(max(peaks) / 2**30, 3), "includes": "UNet bf16 + LoRA r16 fp32 + AdamW "
           "+ activations (gradient checkpointing) + text encoder and VAE (bf16, run)"}
    del s, enc, vae
    torch.cuda.empty_cache()
    return out


def time_steps(a: Setup, b: Setup, reps: int) -> dict:
    """Alternate a (noise) and b (hola, capture installed for the whole run) step by step; medians."""
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    with b.capture() as store:
        for _ in range(2):                   # warm-up: allocator, lazy inits, AdamW state
            a.step(None), b.step(store)
        _sync(a.device)
        for r in range(reps):
            for hola in ((False, True) if r % 2 == 0 else (True, False)):
                t0, c0 = time.perf_counter(), time.process_time()
                (b.step(store) if hola else a.step(None))
                _sync(a.device)
                times[hola].append(time.perf_counter() - t0)
                cpu[hola].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [h / n for n, h in zip(times[False], times[True])]
    return {"noise_step_s_median": round(med[False], 4), "hola_step_s_median": round(med[True], 4),
            "step_ratio": round(med[True] / med[False], 4),
            "paired_ratio_median": round(statistics.median(paired), 4),
            "process_cpu_ratio": round(statistics.median(cpu[True]) / statistics.median(cpu[False]), 4),
            "noise_step_s_all": [round(x, 4) for x in times[False]],
            "hola_step_s_all": [round(x, 4) for x in times[True]],
            "images_per_s": {"noise": round(a.batch / med[False], 2), "hola": round(b.batch / med[True], 2)}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run: fewer repetitions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="batch size (CPU toy: 8, CUDA SD 1.5: 4)")
    ap.add_argument("--threads", type=int, default=2,
                    help="CPU threads (torch.set_num_threads). On a 2-core machine shared with a busy job, 2 threads "
                         "starve (OpenMP threads wait on each other: one quick run got 15 %% of a core for 20 min); "
                         "use --threads 1 there")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 15, quick 6)")
    ap.add_argument("--arch", default=None, help="model architecture (CPU: toy, CUDA: sd15)")
    ap.add_argument("--image-px", type=int, default=None, help="image side in pixels (toy 64, sd15 512)")
    ap.add_argument("--normalize", choices=("none", "max", "sum"), default=None,
                    help="HOLA map normalisation (default: the preset's, toy max, sd15 none); when given, the "
                         "result file is named with it")
    ap.add_argument("--hola", default=None, help="HolaConfig keys over the preset's, as JSON, e.g. "
                    "'{\"resolutions\": [16], \"heads\": \"mean\"}'; when given, the result file is named with them")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        name = "cuda-" + torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "-")
        hardware = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(args.threads)
        kept = keep_freed_memory()   # as cosmiclite.train's Trainer does on CPU
        name = f"cpu-{os.cpu_count()}core"
        hardware = f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    arch = args.arch or ("sd15" if cuda else "toy")
    image_px = args.image_px or architecture(arch).image_size
    batch = args.batch or (4 if cuda else 8)
    reps = args.reps or (6 if args.quick else 15)
    # HOLA and the LoRA rank as the presets say: configs/toy_lora.yaml for the toy, configs/sd15_lora.yaml otherwise
    preset = yaml.safe_load((ROOT / "configs" / f"{'toy' if arch == 'toy' else 'sd15'}_lora.yaml").read_text())
    hola = HolaConfig.from_dict(preset["hola"])
    keys = {**({"normalize": args.normalize} if args.normalize else {}), **json.loads(args.hola or "{}")}
    if keys:   # --normalize X is short for --hola '{"normalize": "X"}'
        hola = HolaConfig.from_dict({**hola.to_dict(), **keys})
        name += "".join(f"-{k}-" + "-".join(map(str, v if isinstance(v, list) else [v])).replace("/", "of")
                        for k, v in sorted(keys.items()))
    lora_rank = preset["lora"]["rank"]
    bf16 = checkpointing = cuda
    load_before = os.getloadavg()

    a = Setup(arch, image_px, batch, device, lora_rank, hola, bf16, checkpointing)
    out: dict = {"arch": arch, "image_px": image_px, "latent": a.latent, "batch": batch, "lora_rank": lora_rank,
                 **({} if cuda else {"keep_freed_memory": kept}),
                 "hola_resolutions": a.sides, "hola": hola.to_dict(), "bf16": bf16,
                 "gradient_checkpointing": checkpointing, "reps": reps}
    if cuda:   # one model resident: peak memory per variant, each twice
        peaks = {False: [], True: []}
        for hola_on in (False, True, False, True):
            peaks[hola_on].append(cuda_peak(a, hola_on))
        pn, ph = max(p for p, _ in peaks[False]), max(p for p, _ in peaks[True])
        base = peaks[False][0][1]
        out.update({"peak_bytes_noise": pn, "peak_bytes_hola": ph, "resident_bytes_before_step": base,
                    "memory_ratio": round(ph / pn, 4),
                    "activation_peak_ratio": round((ph - base) / max(pn - base, 1), 4)})
    sn, sh = saved_tensor_bytes(a, False), saved_tensor_bytes(a, True)
    out.update({"saved_for_backward_bytes_noise": sn, "saved_for_backward_bytes_hola": sh,
                "saved_for_backward_ratio": round(sh / sn, 4)})
    b = copy.deepcopy(a)
    b.opt = torch.optim.AdamW([p for p in b.unet.parameters() if p.requires_grad], lr=1e-4)
    with b.capture() as store:               # the terms, for the record (and a check that HOLA is really on)
        out["first_step_losses"] = b.loss(store)[1]
    b.opt.zero_grad(set_to_none=True)
    out.update(time_steps(a, b, reps))
    del a, b
    if cuda:
        out.update(lora_hola_batch1_peak(arch, image_px, device, hola))
    load_after = os.getloadavg()
    ratio = {"step_time": out["step_ratio"],
             "memory": out["memory_ratio"] if cuda else out["saved_for_backward_ratio"]}
    result = {"benchmark": "hola_overhead", "device": name, "hardware": hardware,
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
              "memory_measure": "torch.cuda.max_memory_allocated" if cuda else "bytes saved for backward",
              "targets": {"step_time": 1.10, "memory": 1.10, **({"lora_hola_batch1_peak_gb": 12} if cuda else {})},
              "ratio": ratio, "quick": args.quick,
              "load": {"loadavg_before": [round(x, 2) for x in load_before],
                       "loadavg_after": [round(x, 2) for x in load_after]},
              **out}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"hola_overhead-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
