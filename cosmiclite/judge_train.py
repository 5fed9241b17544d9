"""Training the toy attribute judge (`cosmiclite.judge`): augmentation, the render pool, held-out accuracy and
`train_judge` (what `cosmiclite train-judge` runs).

Generated images are blurrier and noisier than clean renders, so training augments with what a decoder does to
an image (`Augment`), and, given a trained toy VAE, with its reconstructions of the renders (`vae_reconstructor`).
Training draws toy people from seeds >= `judge.TRAIN_SEED_START`; every seed below it is held out.
"""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .judge import (
    HELDOUT_SEEDS,
    JUDGE_WEIGHTS,
    N_LABELS,
    TRAIN_SEED_START,
    CNNJudge,
    Judge,
    JudgeConfig,
    JudgeNet,
    deeper,
    finer,
    load_judge,
)
from .metrics import semantic_accuracy
from .protocol import Annotation, Protocol, load_protocol
from .toyworld import render


# ---------------------------------------------------------------------------------------------
# Augmentation: what a decoder does to an image
# ---------------------------------------------------------------------------------------------
@dataclass
class Augment:
    """Random degradations, each drawn per image. `vae` (x in [0,1] -> reconstruction) is applied to a
    `vae_p` share of each batch: pass `vae_reconstructor(vae)` once a toy VAE exists."""
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise_p: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.06)
    resample_p: float = 0.25          # down by 2 (area), back up (bilinear)
    shift: int = 3                    # pixels, replicate-padded
    gain: float = 0.06                # per-channel multiplicative colour jitter
    brightness: float = 0.08
    vae: Callable[[torch.Tensor], torch.Tensor] | None = None
    vae_p: float = 0.5

    def __call__(self, x: torch.Tensor, g: torch.Generator, labels: torch.Tensor | None = None):
        """x (B, 3, H, W) in [0, 1] -> augmented x; with `labels` (B, K, H, W) float maps (e.g. one-hot
        parsing) returns (x, labels) with the same shift applied to both (nothing else touches labels)."""
        B, _, H, W = x.shape
        u = lambda *s: torch.rand(*s, generator=g).to(x.device)  # noqa: E731  (draws on g: same on every device)
        if self.vae is not None and self.vae_p > 0:
            m = u(B) < self.vae_p
            if m.any():
                with torch.no_grad():
                    x = x.clone()
                    x[m] = self.vae(x[m]).clamp(0, 1)
        if self.shift:
            s = self.shift
            both = x if labels is None else torch.cat([x, labels], 1)
            xp = F.pad(both, (s, s, s, s), mode="replicate")
            dx, dy = torch.randint(0, 2 * s + 1, (2, B), generator=g).to(x.device)
            rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]      # (B, H, 1)
            cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]      # (B, 1, W)
            both = xp[torch.arange(B, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()
            x, labels = (both, None) if labels is None else (both[:, :3], both[:, 3:])
        m = u(B) < self.resample_p
        if m.any():
            x = x.clone()
            x[m] = F.interpolate(F.avg_pool2d(x[m], 2), size=(H, W), mode="bilinear", align_corners=False)
        if self.blur_p > 0:
            lo, hi = self.blur_sigma
            sigma = lo + (hi - lo) * u(B)
            sigma[u(B) >= self.blur_p] = 0.0
            x = _gaussian_blur(x, sigma)
        gain = 1 + self.gain * (2 * u(B, 3, 1, 1) - 1)
        bright = 1 + self.brightness * (2 * u(B, 1, 1, 1) - 1)
        x = x * gain * bright
        if self.noise_p > 0:
            lo, hi = self.noise_std
            std = (lo + (hi - lo) * u(B, 1, 1, 1)) * (u(B, 1, 1, 1) < self.noise_p)
            x = x + std * torch.randn(x.shape, generator=g).to(x.device)
        x = x.clamp(0, 1)
        return x if labels is None else (x, labels)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (sigma 0 = identity), as one grouped conv."""
    B, C, H, W = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)                               # (B, 2r+1); sigma~0 -> a delta
    k = k.repeat_interleave(C, 0)                                # (B*C, 2r+1)
    y = F.pad(x.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def vae_reconstructor(vae, sample: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a diffusers `AutoencoderKL` as x in [0,1] -> decode(encode(x)) in [0,1], for `Augment.vae`."""
    vae = vae.eval()

    @torch.no_grad()
    def rec(x: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(x * 2 - 1).latent_dist
        z = dist.sample() if sample else dist.mode()
        return (vae.decode(z).sample + 1) / 2

    return rec


# ---------------------------------------------------------------------------------------------
# Training data from the toy world
# ---------------------------------------------------------------------------------------------
def render_batch(seeds: Iterable[int], size: int = 64, sampling=None) -> tuple[np.ndarray, list[Annotation]]:
    """Render toy people: images (B, H, W, 3) uint8 and their annotations."""
    images, _, annotations = _render_people(seeds, size, sampling)
    return images, annotations


def _render_people(seeds: Iterable[int], size: int = 64,
                   sampling=None) -> tuple[np.ndarray, np.ndarray, list[Annotation]]:
    """Images (B, H, W, 3), ATR parsing maps (B, H, W) and annotations of the toy people of `seeds`."""
    people = [render(int(s), size=size, sampling=sampling) for s in seeds]
    return (np.stack([p.image for p in people]), np.stack([p.parsing for p in people]),
            [p.annotation for p in people])


def render_pool(start: int, n: int, size: int = 64, workers: int = 1,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[Annotation]]:
    """Toy people of seeds start..start+n-1: images (n, H, W, 3), ATR parsing maps (n, H, W), annotations.

    With `workers` > 1 the seeds are drawn in chunks by that many processes (the same people, in seed order).
    """

    chunk = 2000
    chunks = [range(a, min(a + chunk, start + n)) for a in range(start, start + n, chunk)]
    bar = tqdm(total=n, desc="render toy people", disable=not progress)
    parts = []
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as ex:
        for seeds, part in zip(chunks, (ex.map if ex else map)(_render_people, chunks, [size] * len(chunks))):
            parts.append(part)
            bar.update(len(seeds))
    bar.close()
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [a for p in parts for a in p[2]])


def heads_for(annotations: Iterable[Annotation], protocol: Protocol | None = None) -> dict[str, list[str]]:
    """Heads for the judge: every question the toy world answers with a real value in `annotations`,
    with the protocol's full answer vocabulary (answers never drawn are simply never predicted)."""
    protocol = protocol or load_protocol()
    seen = {q for a in annotations for q, v in a.answers.items() if v not in protocol.special_answers}
    return {q.id: list(q.answers) for q in protocol.questions if q.id in seen}


def targets(annotations: Sequence[Annotation], heads: Mapping[str, list[str]]) -> torch.Tensor:
    """(N, n_heads) class indices, -1 where an annotation has no real answer (masked out of the loss)."""
    index = [{a: i for i, a in enumerate(ans)} for ans in heads.values()]
    return torch.tensor([[ix.get(a.answers.get(q, ""), -1) for q, ix in zip(heads, index)]
                         for a in annotations], dtype=torch.long).reshape(len(annotations), len(heads))


def heldout_accuracy(judge: Judge, seeds: Iterable[int], size: int = 64, batch: int = 250):
    """Semantic accuracy of `judge` on clean toy renders of `seeds` (none may be a training seed)."""
    seeds = list(seeds)
    bad = [s for s in seeds if s >= TRAIN_SEED_START]
    if bad:
        raise ValueError(f"seeds {bad[:5]} are training seeds (>= {TRAIN_SEED_START}); held-out seeds must be below it")
    judged, refs = [], []
    for i in range(0, len(seeds), batch):
        imgs, anns = render_batch(seeds[i:i + batch], size)
        judged += judge.answer(imgs)
        refs += anns
    return semantic_accuracy(judged, refs, judge_questions=judge.questions, parents="independent")


def heldout_record(judge: Judge, seeds: Iterable[int], size: int = 64) -> dict:
    """`heldout_accuracy` as judge.json records it (info.heldout): by kind, per question, asked, chance levels."""
    res = heldout_accuracy(judge, seeds, size)
    per_q = {q.id: round(q.accuracy, 4) for q in res.questions}
    return {"acc_obj": res.acc_obj, "acc_tex": res.acc_tex, "acc_shape": res.acc_shape, "acc_all": res.acc_all,
            "min_question": min(per_q.values()), "per_question": per_q,
            "asked": {q.id: q.asked for q in res.questions},
            "chance_majority": {q.id: round(q.chance_majority, 4) for q in res.questions},
            "chance_uniform": {q.id: round(q.chance_uniform, 4) for q in res.questions}}


@dataclass
class JudgeTrainConfig:
    steps: int = 1500
    batch: int = 64
    pool: int = 12000                 # toy people rendered once (seeds from TRAIN_SEED_START), re-augmented each draw
    lr: float = 3e-3
    parse_weight: float = 1.0         # the auxiliary parsing loss (see JudgeNet)
    weight_decay: float = 1e-4
    size: int = 64
    threads: int = 2
    seed: int = 0
    eval_seeds: int = len(HELDOUT_SEEDS)
    init: str | None = None           # continue from a trained judge's weights (its heads must match)
    vae_pool: int = 4096              # with a VAE: the first this many pool people are also seen reconstructed
    parse_stride: int = 4             # JudgeConfig.parse_stride (2: regions read at 1/2 of the side); with init, a
                                      # stride-4 judge asked for 2 is widened by `finer`
    fine_blocks: int = 0              # JudgeConfig.fine_blocks; with init, a judge with fewer is deepened by `deeper`
    device: str = "cpu"               # where the net trains and is measured ("cuda": pool, batches, augmentation there)
    workers: int = 1                  # processes rendering the pool


def train_judge(cfg: JudgeTrainConfig | None = None, augment: Augment | None = None,
                out: str | Path | None = JUDGE_WEIGHTS, command: str | None = None,
                progress: bool = True) -> tuple[CNNJudge, dict]:
    """Train the CNN judge on toy renders (seeds TRAIN_SEED_START .. + pool), then measure it.

    Why a pool rather than fresh renders every step: on the shared 2-core CPU rendering costs about as
    much as a training step, and the augmentation already makes every draw a new image.
    One-cycle AdamW; per head, cross-entropy over the images whose annotation answers that question,
    averaged over heads. Then held-out accuracy on clean renders of seeds 0..eval_seeds-1; weights and
    JSON (config, command, seeds, accuracy, time) are written to `out` and beside it.
    """
    cfg = cfg or JudgeTrainConfig()

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    augment = augment if augment is not None else Augment()
    t0 = time.time()
    device = torch.device(cfg.device)
    imgs, parsings, anns = render_pool(TRAIN_SEED_START, cfg.pool, cfg.size, cfg.workers, progress)
    pool = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 (N, 3, H, W)
    pool_parsing = torch.from_numpy(parsings).to(device)                        # (N, H, W) uint8 ATR labels
    heads = heads_for(anns)
    y = targets(anns, heads).to(device)
    del imgs, parsings, anns
    render_s = time.time() - t0
    pool_vae = None
    if augment.vae is not None and augment.vae_p > 0:
        # Reconstruct the first `vae_pool` people once (the toy VAE takes ~80 ms per image on one core, as
        # long as a training step per 20 images) and draw a `vae_p` share of every batch from them.
        n_vae = min(cfg.vae_pool, len(pool))
        chunks = [augment.vae(pool[i:min(i + 256, n_vae)].float() / 255.0)
                  for i in tqdm(range(0, n_vae, 256), desc="VAE reconstructions", disable=not progress)]
        pool_vae = (torch.cat(chunks).clamp(0, 1) * 255).round().to(torch.uint8)
        augment, vae_p = replace(augment, vae=None), augment.vae_p
    jcfg = JudgeConfig(heads=heads, size=cfg.size, parse_stride=cfg.parse_stride, fine_blocks=cfg.fine_blocks)
    net = JudgeNet(jcfg)
    previous = None
    if cfg.init:
        start = load_judge(cfg.init)
        if cfg.parse_stride < start.cfg.parse_stride:       # widen it: start from its accuracy, read finer
            start = finer(start)
        if cfg.fine_blocks > start.cfg.fine_blocks:          # deepen it: new blocks start as the identity
            start = deeper(start, cfg.fine_blocks - start.cfg.fine_blocks)
        if start.cfg.heads != heads or start.cfg.size != cfg.size:
            raise ValueError(f"--init {cfg.init}: its heads/size do not match this toy world's "
                             f"({sorted(set(start.cfg.heads) ^ set(heads))}); train from scratch instead")
        jcfg, net, previous = start.cfg, start.net.train(), start.cfg.info
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    net.train()
    bar = tqdm(range(cfg.steps), desc="train judge", disable=not progress)
    running = None
    for step in bar:
        idx = torch.randint(0, len(pool), (cfg.batch,), generator=g)
        if pool_vae is not None:
            rec = torch.rand(cfg.batch, generator=g) < vae_p
            idx = torch.where(rec, torch.randint(0, len(pool_vae), (cfg.batch,), generator=g), idx)
            rec = rec.to(device)
        idx = idx.to(device)
        onehot = F.one_hot(pool_parsing[idx].long(), N_LABELS).permute(0, 3, 1, 2).float()
        x = pool[idx] if pool_vae is None else torch.where(rec[:, None, None, None], pool_vae[idx % len(pool_vae)],
                                                           pool[idx])
        x, onehot = augment(x.float() / 255.0, g, onehot)
        share = F.avg_pool2d(onehot, jcfg.parse_stride)    # each cell's label shares: small parts survive
        t = y[idx]
        logits, parse = net(x)
        losses = [F.cross_entropy(logits[q], t[:, k], ignore_index=-1)
                  for k, q in enumerate(heads) if (t[:, k] >= 0).any()]
        parse_loss = -(share * parse.log_softmax(1)).sum(1).mean()
        loss = torch.stack(losses).mean() + cfg.parse_weight * parse_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
    train_s = time.time() - t0
    judge = CNNJudge(net.eval(), jcfg)
    heldout = heldout_record(judge, range(cfg.eval_seeds), cfg.size)    # read on `device`, weights kept on the CPU
    judge.net.cpu()
    info = {
        "command": command or "cosmiclite train-judge",
        "train": asdict(cfg), "augment": {k: v for k, v in asdict(augment).items() if k != "vae"},
        "vae_augmented": pool_vae is not None,
        "train_seeds": [TRAIN_SEED_START, TRAIN_SEED_START + cfg.pool], "heldout_seeds": [0, cfg.eval_seeds],
        "render_seconds": round(render_s, 1), "train_seconds": round(train_s, 1),
        "final_loss": round(running, 4), "torch": torch.__version__, "threads": cfg.threads,
        "params": sum(p.numel() for p in net.parameters()),
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "heldout": heldout, "heldout_shifts": list(jcfg.shifts),
    }
    if previous:  # a continued run: keep the history of every stage that made these weights
        info["continued_from"] = {k: previous.get(k) for k in
                                  ("command", "train_seconds", "render_seconds", "train", "continued_from")}
        info["total_train_seconds"] = round(train_s + previous.get("total_train_seconds",
                                                                    previous.get("train_seconds", 0)), 1)
    jcfg.info = info
    if out is not None:
        judge.save(out)
    return judge, info
