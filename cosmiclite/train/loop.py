"""The training loop: one `Trainer` on accelerate, whose step is Eq. 4 (`Trainer.daring_step`).

The step computes what notebooks/05_hola_loss.ipynb computes by hand: the UNet forward inside the training capture,
`hola_terms` on its maps for the samples `HolaConfig.sample_keep` keeps, and `daring_loss`. Everything else here is
the machinery around it: accelerate's set-up, the optimizer over `Trainer.trainable_parameters`, gradient
accumulation, the EMA, logging, checkpoints (`checkpoints`), outputs (`export`) and validation images.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
)
from diffusers import UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm

from .. import models
from ..attention import capture_cross_attention
from ..hola import daring_loss, hola_terms
from ..hola_fused import fused_eq3_bracket
from ..scaling import GiB, global_batch
from ..toy_vae import calibrate_vae_scaling, vae_loss
from .checkpoints import latest_checkpoint, load_ema, resume_checkpoint, save_checkpoint, save_ema, save_trainable_only
from .components import load_components, text_embeddings
from .config import ConfigError, TrainConfig, load_config
from .data import DROP, LATENT, NOISE, TIME, TrainData, per_sample_rand, per_sample_randn, sample_timesteps
from .export import save_full_pipeline, save_lora
from .setup import (
    captured_sides,
    fill_deepspeed_config,
    freeze_conditioning,
    make_ema,
    make_optimizer,
    prepare_trainable,
    trainable_parameters,
)

__all__ = ["Trainer", "train", "run_cli", "keep_freed_memory"]


def keep_freed_memory() -> bool:
    """On glibc, keep freed memory in the process for reuse instead of handing it back to the OS; True if set.

    A CPU training step allocates and frees the same large tensors every step (HOLA's attention maps: 10 MB a
    layer at the toy preset's batch 16). glibc serves such blocks by mmap and gives them back by munmap or by
    trimming the heap, so the next step faults every page in again (each 4 KB zeroed by the kernel). With the mmap
    threshold at its maximum (32 MiB on 64-bit) and no trimming they stay (docs/results.md, Speed and memory). The
    process's memory stays at its peak, which a training run reaches every step anyway. Setting the trim threshold
    alone made steps slower (it also turns glibc's adaptive mmap threshold off): both are set.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _accelerator(cfg: TrainConfig, output: Path) -> Accelerator:
    """accelerate's Accelerator for this config (see the comments for each choice)."""
    # gradient_accumulation_steps: accelerate's accumulate() skips the DDP/FSDP all-reduce on the first
    # grad_accum − 1 micro-steps and tells DeepSpeed its accumulation. step_scheduler_with_optimizer=False:
    # the LR schedule counts optimizer steps whatever the process count (a checkpoint resumes under any W).
    # gradient_as_bucket_view: DDP's gradients live in its all-reduce buckets (no second fp32 gradient copy).
    # Launched by torchrun/accelerate with several processes on a machine without a GPU: accelerate 1.x forms
    # the gloo group (DistributedType.MULTI_CPU) only when told cpu=True; otherwise every process would train
    # alone, each believing it is the only one.
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    acc = Accelerator(mixed_precision=cfg.run.mixed_precision, cpu=world_env > 1 and not torch.cuda.is_available(),
                      # a plugin, not gradient_accumulation_steps=: accelerate launch's environment
                      # (ACCELERATE_GRADIENT_ACCUMULATION_STEPS) must not override run.grad_accum
                      gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.run.grad_accum,
                                                                              sync_with_dataloader=False),
                      step_scheduler_with_optimizer=False,
                      kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
                      project_config=ProjectConfiguration(project_dir=str(output)),
                      log_with="tensorboard" if cfg.run.tensorboard else None)
    if acc.num_processes != world_env:
        raise RuntimeError(f"WORLD_SIZE={world_env} but accelerate formed a group of {acc.num_processes} process(es) "
                           f"({acc.distributed_type}): launch with `accelerate launch` or `torchrun`")
    return acc


class Trainer:
    """One training run: models, data, optimizer, the loop, checkpoints and outputs (see `cosmiclite.train`)."""

    def __init__(self, cfg: TrainConfig, output: str | Path | None = None):
        self.cfg = cfg
        self.output = Path(output or cfg.output)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.acc = _accelerator(cfg, self.output)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if self.acc.device.type == "cpu":
            keep_freed_memory()
        self.is_fsdp = self.acc.distributed_type == DistributedType.FSDP
        self.is_deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
        if cfg.stage == "vae" and self.world > 1:
            raise ConfigError("stage=vae runs on one process (the toy autoencoder is small): launch it without "
                              "accelerate/torchrun multi-process")
        if cfg.ema is not None and self.is_fsdp:
            raise ConfigError("ema is set but FSDP shards the UNet's weights (an EMA would hold shards): use DDP "
                              "(configs/accelerate/multi_gpu.yaml) or DeepSpeed ZeRO-2 for EMA, or set `ema: null`")
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.run.mixed_precision, torch.float32)
        self.components = load_components(cfg)
        if cfg.stage == "unet":
            freeze_conditioning(self.components, self.acc.device, self.weight_dtype)
            self.noise_scheduler = models.training_scheduler(self.components["scheduler"])
        self.image_size = cfg.data.image_size
        self.data = TrainData(cfg, self.components, rank=self.rank, world=self.world)
        self.model = prepare_trainable(cfg, self.components, self.acc.device, self.weight_dtype)
        self.ema = make_ema(cfg, self.model) if cfg.ema is not None else None   # fp32 copies, before any cast
        self.optimizer, self.lr_scheduler = make_optimizer(cfg, self.trainable_parameters(), self.world)
        if self.is_deepspeed:
            fill_deepspeed_config(self.acc.state.deepspeed_plugin.deepspeed_config, cfg, self.world)
        self.model, self.optimizer, self.lr_scheduler = self.acc.prepare(self.model, self.optimizer, self.lr_scheduler)
        # The UNet's input dtype: autocast casts for DDP/FSDP/one process; DeepSpeed (and the LoRA base) hold the
        # weights themselves in the training dtype, so z_t must come in that dtype.
        self.input_dtype = self.weight_dtype if (cfg.lora is not None or self.is_deepspeed) else torch.float32
        if cfg.lora is not None:
            save_trainable_only(self.acc)
        self.store, self._capture, self.hola_sides = None, None, ()
        if cfg.stage == "unet" and cfg.hola.beta > 0:
            # installed on the unwrapped UNet (the module inside DDP / the DeepSpeed engine / the root FSDP unit),
            # whose forward every wrapper calls, so every attention layer records as in one process
            self.hola_sides = tuple(cfg.hola.sides(captured_sides(self.components, self.image_size), self.image_size))
            self._capture = capture_cross_attention(self.acc.unwrap_model(self.model), "training",
                                                    resolutions=self.hola_sides, **cfg.hola.capture_options())
            self.store = self._capture.__enter__()
        self.step = 0

    # ---- models
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return trainable_parameters(self.model)

    # ---- checkpoints
    def save_checkpoint(self) -> Path:
        """This step's checkpoint, written atomically (`checkpoints.save_checkpoint`), with the EMA beside it."""
        unwrapped = self.acc.unwrap_model(self.model)
        return save_checkpoint(self.acc, self.output, self.step,
                               {"step": self.step, "world": self.world, "config": self.cfg.to_dict()},
                               keep=self.cfg.run.keep_checkpoints,
                               extra=None if self.ema is None else lambda folder: save_ema(self.ema, unwrapped, folder))

    def resume(self) -> int:
        """Load the newest complete checkpoint; returns its step (0 when there is none)."""
        found = resume_checkpoint(self.acc, self.output)
        if found is None:
            return 0
        self.step, folder = found
        if self.ema is not None:
            load_ema(self.ema, self.acc.unwrap_model(self.model), folder)
        return self.step

    # ---- the losses
    def prepare_data(self) -> None:
        """Mask sides (HOLA's) and the latent pool; done by `run`, and by whoever calls the step functions alone."""
        self.data.prepare(self.hola_sides, self.acc.device, self.acc.is_local_main_process)

    def daring_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Eq. 4 on one micro-batch, as notebook 05 computes it:

            z_0 = E(x)·scaling,  ε ~ N(0, I),  t ~ p(t),  z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε                   (Eq. 1)
            L_noise = ‖ε − ε_θ(z_t, t, τ(c))‖²   (the v-target when the scheduler predicts v)
            L_HOLA  = Eq. 3 on the maps captured in that forward, over the samples `sample_keep` keeps
            L       = α·L_noise + β·L_HOLA                                                            (Eq. 4)

        Every draw (z_0, ε, t, the HOLA drop) is keyed by the sample's position (`train.data`): exact resume.
        """
        cfg, hola, dev, pos = self.cfg, self.cfg.hola, self.acc.device, batch["pos"]
        z0 = self.data.latents(batch).to(dev, torch.float32)
        noise = per_sample_randn(cfg.seed, pos, NOISE, z0.shape[1:]).to(dev)
        t = sample_timesteps(per_sample_rand(cfg.seed, pos, TIME), self.noise_scheduler.config.num_train_timesteps,
                             cfg.run.timestep_gamma).to(dev)
        zt = self.noise_scheduler.add_noise(z0, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(z0, noise, t)
        else:
            target = noise
        with torch.no_grad():
            states, added = text_embeddings(self.components, batch["input_ids"], self.image_size, dev,
                                            self.weight_dtype)
        with self.acc.autocast():
            pred = self.model(zt.to(self.input_dtype), t, states, added_cond_kwargs=added).sample
        noise_loss = F.mse_loss(pred.float(), target.float())
        if self.store is None:           # β = 0: the noise loss alone
            return {"noise_loss": noise_loss, "loss": daring_loss(noise_loss, 0.0, hola)}
        keep = hola.sample_keep(len(pos), device=dev, uniforms=per_sample_rand(cfg.seed, pos, DROP))
        terms = hola_terms(self.store.maps(), batch["spans"], {k: v.to(dev) for k, v in batch["masks"].items()},
                           batch["present"], hola, image_size=self.image_size, keep=keep, bracket=fused_eq3_bracket)
        hola_loss = terms.loss * self._hola_dp_weight(terms.n_samples) if self.world > 1 else terms.loss
        return {"noise_loss": noise_loss, "hola_loss": hola_loss, "loss": daring_loss(noise_loss, hola_loss, hola)}

    def _hola_dp_weight(self, n_local: int) -> float:
        """L_HOLA is a mean over the samples that count (kept, with a group in the loss). DDP averages the W
        processes' gradients, which equals the global batch's mean only if every process counts as many samples.
        Weighting process r's mean by W·n_r / Σ n makes the average of the W losses (and gradients) exactly the
        mean over the global micro-batch, i.e. what one process with batch W·B computes."""
        n = torch.tensor([float(n_local)], device=self.acc.device)
        total = float(self.acc.reduce(n, reduction="sum").item())
        return self.world * n_local / total if total > 0 else 0.0

    def vae_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """stage vae: the toy autoencoder's loss (`cosmiclite.toy_vae`), z ~ q(z|x) keyed by sample position."""
        x = batch["pixel_values"].to(self.acc.device, torch.float32)
        return vae_loss(self.acc.unwrap_model(self.model), x,
                        lambda shape: per_sample_randn(self.cfg.seed, batch["pos"], LATENT, shape),
                        self.cfg.run.kl_weight, self.acc.autocast())

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
        bar = tqdm(total=total, initial=self.step, desc=f"train {cfg.stage}",
                   disable=not self.acc.is_local_main_process)
        step_fn = self.vae_step if cfg.stage == "vae" else self.daring_step
        self.prepare_data()
        params = self.trainable_parameters()
        t_last, n_last, last = time.perf_counter(), self.step, {}
        while self.step < total:
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.run.grad_accum):
                batch = self.data.batch(self.step * cfg.run.grad_accum + micro)
                # accumulate(): no gradient all-reduce until the last micro-step; backward divides by grad_accum
                with self.acc.accumulate(self.model):
                    out = step_fn(batch)
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
                self.ema.step(list(self.acc.unwrap_model(self.model).parameters()))
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
                last = self._log_row(acc_logs, s_per_step)
                log.write(last)
                if cfg.run.tensorboard:
                    self.acc.log(last, step=self.step)
            if self.step % cfg.run.checkpoint_every == 0 or self.step == total:
                self.save_checkpoint()
            if cfg.validation.every and self.step % cfg.validation.every == 0 and cfg.stage == "unet":
                self.render_validation_images()
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        self.save_outputs()
        self.acc.end_training()
        return {"step": self.step, "output": str(self.output), **last}

    def _log_row(self, losses: dict[str, float], s_per_step: float) -> dict:
        r = self.cfg.run
        row = {"step": self.step, **{k: round(v, 6) for k, v in losses.items()},
               "lr": self.lr_scheduler.get_last_lr()[0], "s_per_step": round(s_per_step, 4),
               "images_per_s": round(global_batch(r.batch_size, self.world, r.grad_accum) / s_per_step, 3)}
        if self.acc.device.type == "cuda":        # this process's peak since the start
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.acc.device) / GiB, 3)
        return row

    # ---- outputs
    def _write_config(self) -> None:
        if self.acc.is_main_process:
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
            model = UNet2DConditionModel.from_config(model.config)
            model.load_state_dict(full_state)
        if self.cfg.stage == "vae":
            info = calibrate_vae_scaling(model, self.data.images(512), self.acc.device)
            model.save_pretrained(self.output / "vae", safe_serialization=True)
            (self.output / "vae" / "eval.json").write_text(json.dumps(info, indent=2))
        elif self.cfg.lora is not None:
            save_lora(model, self.output / "lora", self.cfg.lora, sdxl="text_encoder_2" in self.components)
        else:
            if self.ema is not None:   # training is over: the UNet takes the EMA weights for good
                model.save_pretrained(self.output / "unet_raw", safe_serialization=True)
                self.ema.copy_to(model.parameters())
            save_full_pipeline(self.cfg, self.components, model, self.output / "pipeline")

    def render_validation_images(self) -> Path | None:
        """Images for the validation prompts (`render_validation_images`), on the main process only."""
        if not self.cfg.validation.prompts or not self.acc.is_main_process:
            return None
        if self.is_fsdp:
            if not getattr(self, "_warned_fsdp_validation", False):
                print("cosmiclite.train: validation images are skipped under FSDP (the UNet is sharded across "
                      "processes); sample from OUTPUT/pipeline after training", file=sys.stderr)
                self._warned_fsdp_validation = True
            return None
        return render_validation_images(self.cfg.validation, self.components, self.acc.unwrap_model(self.model),
                                        self.image_size, self.output / "validation" / f"step-{self.step}.png",
                                        store=self.store, ema=self.ema)


@contextmanager
def _sampling_weights(unet, store, ema):
    """For sampling: the EMA weights in the UNet (diffusers' store / copy_to / restore) if there is an EMA, and the
    training capture paused (guidance doubles the batch; the capture has nothing to record there)."""
    params = list(unet.parameters())
    res = store.resolutions if store is not None else None
    if store is not None:
        store.resolutions = ()
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        yield unet
    finally:
        if ema is not None:
            ema.restore(params)
        if store is not None:
            store.resolutions = res


@torch.no_grad()
def render_validation_images(v, components: dict, unet, image_size: int, path: Path, store=None, ema=None) -> Path:
    """One row of images for the validation prompts `v.prompts` with the UNet's current weights (the EMA weights
    when there is an EMA) into `path` (OUTPUT/validation/step-N.png)."""
    comps = dict(components)
    comps["unet"] = unet
    pipe = models.pipeline_from_components(comps)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    with _sampling_weights(unet, store, ema):
        imgs = pipe(list(v.prompts), num_inference_steps=v.steps, guidance_scale=v.guidance, height=image_size,
                    width=image_size, output_type="np", generator=torch.Generator().manual_seed(v.seed)).images
    unet.train(was_training)
    grid = np.concatenate([(im * 255).round().astype(np.uint8) for im in imgs], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


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


# ---- entry points

def train(config: str | Path | TrainConfig | Mapping, max_steps: int | None = None, output: str | Path | None = None,
          resume: bool = False, **overrides) -> dict:
    """Run one training config (see `cosmiclite.train`); returns the last logged row (step, losses, s/step)."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, **overrides)
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps={max_steps}: must be >= 1")
    return Trainer(cfg, output).run(max_steps=max_steps, resume=resume)


def run_cli(args: argparse.Namespace) -> int:
    """`cosmiclite train` / `python -m cosmiclite.train`: --config, --set KEY=VALUE overrides, --max-steps, ..."""
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set run.batch_size=8")
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    result = train(args.config, max_steps=args.max_steps, output=args.output, resume=args.resume, **overrides)
    print(json.dumps(result))
    return 0
