"""What each training step reads: which samples, their augmented captions, masks and latents — a pure function of
(seed, step, process), so that resume and data parallelism are exact.

Every random draw of a training sample (which person, caption augmentation, z_0 ~ q(z|x), ε, t, the HOLA drop) is
keyed by the sample's global position in the run, never by a process's RNG stream: a resumed run replays the same
draws, and 2 processes × batch b draw exactly what 1 process × batch 2b draws.

A sample is built by `cosmiclite.data.training_sample`, the same builder the notebooks use; this module adds only
what training needs around it: positions, the caption augmentation of Sec. 4.2 and the latent pool.
"""
from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..captions import compose
from ..data import collate, read_imagefolder, to_pixels, training_sample
from ..protocol import load_protocol
from ..toyworld import render
from .config import ConfigError, TrainConfig

__all__ = ["TrainData", "sample_seed", "per_sample_randn", "per_sample_rand", "sample_timesteps",
           "PICK", "CAPTION", "LATENT", "NOISE", "TIME", "DROP"]

# purposes of the per-sample draws
PICK, CAPTION, LATENT, NOISE, TIME, DROP = range(1, 7)


def sample_seed(*keys: int) -> int:
    """A 63-bit seed from (run seed, sample position, purpose): what makes resume and data parallelism exact."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & (2 ** 63 - 1)


def per_sample_randn(seed: int, pos: torch.Tensor, purpose: int, shape: Sequence[int]) -> torch.Tensor:
    """(B, *shape) standard normals, row b drawn from its own generator keyed by pos[b]."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, int(p),
                                                                                                     purpose)))
                        for p in pos])


def per_sample_rand(seed: int, pos: torch.Tensor, purpose: int) -> torch.Tensor:
    """(B,) uniforms in [0, 1), one per sample, keyed by its position."""
    return torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(sample_seed(seed, int(p), purpose)))
                      for p in pos])


def sample_timesteps(u: torch.Tensor, num_train_timesteps: int, gamma: float) -> torch.Tensor:
    """t = ⌊T·u^γ⌋ for uniforms u: uniform for γ = 1; γ < 1 gives the noisy steps, where prompts matter, more weight."""
    return (num_train_timesteps * u.pow(gamma)).long().clamp_(0, num_train_timesteps - 1)


class TrainData:
    """Samples picked by position, captions augmented, masks and latents (see `batch`).

    Sample positions: micro-step k of process r holds the global positions k·B·W + r·B + i (B per-process batch,
    W processes). A finite dataset of N items is walked in a fresh seeded permutation every epoch; the endless
    toy world gives position p the person of seed first_seed + p.
    """

    def __init__(self, cfg: TrainConfig, components: dict, rank: int = 0, world: int = 1):
        self.cfg, self.d, self.rank, self.world = cfg, cfg.data, rank, world
        self.size = cfg.data.image_size
        self.protocol = load_protocol()
        self.body = [g.name for g in self.protocol.groups if g.level == "body"]
        self.tokenizer = components.get("tokenizer")
        self.vae = components.get("vae") if cfg.stage == "unet" else None
        self.need_masks = cfg.stage == "unet" and cfg.hola.beta > 0
        self.mask_sizes: tuple[int, ...] = tuple(cfg.data.mask_sizes or ())
        self.folder = None
        if self.d.source == "folder":
            self.folder, report = read_imagefolder(Path(self.d.path).expanduser())
            if not self.folder:
                raise ConfigError(f"data.path={self.d.path!r}: no usable sample ({report})")
            self.n: int | None = len(self.folder)
        else:
            self.n = self.d.num_samples
        self._perms: dict[int, np.ndarray] = {}
        self.pool: dict[str, Any] | None = None

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
            self._perms[epoch] = np.random.default_rng(sample_seed(self.cfg.seed, epoch, PICK)).permutation(self.n)
        return int(self._perms[epoch][k])

    # ---- one item's raw material
    def raw(self, idx: int) -> tuple[np.ndarray, Any, np.ndarray | None, str]:
        """(image uint8 HxWx3, annotation (or caption text), parsing HxW or None, label set) of item idx."""
        if self.folder is not None:
            r = self.folder[idx]
            image, parsing = r.image, r.parsing
            if image.shape[:2] != (self.size, self.size):       # resize to the training size
                image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BICUBIC))
                if parsing is not None:
                    parsing = np.asarray(Image.fromarray(parsing).resize((self.size, self.size), Image.NEAREST))
            has_answers = r.annotation is not None and bool(r.annotation.answers)
            return image, (r.annotation if has_answers else (r.caption or "")), parsing, r.label_set
        person = render(self.d.first_seed + idx if self.n is not None else idx, size=self.size)
        return person.image, person.annotation, person.parsing, "atr"

    def caption_for(self, annotation, pos: int) -> dict:
        """The caption of sample `pos` as `training_sample` keywords, augmented as CosmicMan trains (Sec. 4.2): the
        body group first, the other groups shuffled, each dropped with data.caption.group_drop, and the caption
        emptied with data.caption.uncond (classifier-free guidance dropout). A caption without answers (text) is
        used as it is."""
        cap = self.d.caption
        rng = random.Random(sample_seed(self.cfg.seed, pos, CAPTION))
        if rng.random() < cap.uncond:    # unconditional dropout: the empty caption, no group
            return {"annotation": None, "caption": ""}
        if isinstance(annotation, str):  # a caption without answers: no augmentation, free-text spans
            return {"annotation": None, "caption": annotation}
        rest = [g.name for g in self.protocol.groups if g.name not in self.body]
        if cap.shuffle_groups:
            rng.shuffle(rest)
        drop = [g for g in rest if rng.random() < cap.group_drop]
        return {"annotation": annotation,
                "caption_fn": partial(compose, protocol=self.protocol, group_order=self.body + rest, drop=drop)}

    def sample(self, image: np.ndarray | None, annotation, parsing: np.ndarray | None, label_set: str,
               pos: int) -> dict:
        """One sample by `cosmiclite.data.training_sample`; masks only when HOLA needs them."""
        return training_sample(image, parsing, label_set=label_set, tokenizer=self.tokenizer,
                               mask_sizes=self.mask_sizes if self.need_masks else (),
                               **self.caption_for(annotation, pos))

    # ---- set-up: mask sizes and the latent pool
    def prepare(self, hola_sides: Sequence[int], device, show: bool) -> None:
        """Mask sides default to the sides HOLA reads; the latent pool is encoded once, here."""
        if self.need_masks and not self.mask_sizes:
            self.mask_sizes = tuple(hola_sides)
        if self.d.latent_pool and self.pool is None and self.cfg.stage == "unet":
            self.pool = self._encode_pool(device, show)

    @torch.no_grad()
    def _encode_pool(self, device, show: bool) -> dict[str, Any]:
        """Encode all N items once: q(z|x) mean and std, annotations, parsing maps (if HOLA needs them)."""
        means, stds, raws = [], [], []
        chunk = 256
        for start in tqdm(range(0, self.n, chunk), desc="encoding latent pool", disable=not show):
            part = [self.raw(i) for i in range(start, min(start + chunk, self.n))]
            post = self.vae.encode(to_pixels([r[0] for r in part]).to(device, self.vae.dtype)).latent_dist
            means.append(post.mean.float().cpu())
            stds.append(post.std.float().cpu())
            raws += [(None, ann, parsing if self.need_masks else None, label_set)
                     for _, ann, parsing, label_set in part]
        return {"mean": torch.cat(means), "std": torch.cat(stds), "raw": raws}

    # ---- a batch
    def batch(self, micro_step: int) -> dict[str, Any]:
        """pos (B,), input_ids (B,77), spans (B,G,2), and pixel_values or pool rows; masks/present when HOLA is on."""
        pos = self.positions(micro_step)
        idx = [self.index(int(p)) for p in pos]
        if self.pool is not None:
            raws = [self.pool["raw"][i] for i in idx]
        else:
            raws = [self.raw(i) for i in idx]
        if self.cfg.stage == "unet":
            out = collate([self.sample(*r, int(p)) for r, p in zip(raws, pos)])
        else:    # the autoencoder reads pixels only
            out = {"pixel_values": to_pixels([r[0] for r in raws])}
        out["pos"] = pos
        if self.pool is not None:
            out["pool_index"] = torch.tensor(idx)
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
        eps = per_sample_randn(self.cfg.seed, batch["pos"], LATENT, mean.shape[1:])
        return sf * (mean + std * eps)

    def images(self, n: int) -> list[np.ndarray]:
        """n held-out images: the folder's first n, or toy people from seeds no run trains on."""
        if self.folder is not None:
            return [self.folder[i].image for i in range(min(n, len(self.folder)))]
        return [render(10 ** 9 + i, size=self.size).image for i in range(n)]
