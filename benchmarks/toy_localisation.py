"""Does the toy model's cross-attention localise? Short, measured ablations for toy model v3 (docs/results.md).

Each run trains the toy UNet (and, with --te train, its text encoder) for --steps steps on a pool of toy people
encoded once by the shipped VAE, with the toy preset's caption augmentation (groups shuffled, 5 % dropped, 10 %
empty), the noise loss, and optionally L_HOLA on chosen mask groups only (--hola-groups: can one group's term move
one group's map?). Every --eval-every steps it reads part specificity, lift and the group x part matrix
(`cosmiclite.alignment`) on held-out people at t = 250/500/750, and the share of attention on padding tokens.

    python benchmarks/toy_localisation.py NAME [--init scratch|v2] [--te frozen|train] [--te-layers L]
        [--te-zero-res] [--pad-mask] [--unet-heads H] [--xattn 16,8] [--no-ff] [--qk-mult X]
        [--hola-groups tops --beta 1] [--steps N] [--batch B] [--lr LR] [--threads T]

Appends every evaluation to benchmarks/results/toy_localisation-cpu-2core.json ({"runs": [...]}) and prints the
last as one JSON line whose "ratio" is the 16x16 part specificity (1: one map shared by every part).

But: one seed per run, short runs, a small pool; `--pad-mask` masks the padding out of cross-attention, which a
stock pipeline does not do (a probe, not a recipe).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from cosmiclite import models, toyworld
from cosmiclite.alignment import Alignment, person_rows
from cosmiclite.attention import capture_cross_attention
from cosmiclite.captions import compose
from cosmiclite.demo import held_out_people
from cosmiclite.discretize import discretize
from cosmiclite.hola import HolaConfig, hola_loss
from cosmiclite.masks import mask_set
from cosmiclite.protocol import load_protocol

RESULTS = Path(__file__).parent / "results" / "toy_localisation-cpu-2core.json"
MASK_NAMES = list(mask_set(np.zeros((64, 64), np.uint8), sizes=(16,)).names)
HOLA = HolaConfig(resolutions=(16,), heads="per_head", normalize="max", drop_prob=0.0)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--te-lr", type=float, default=None)
    ap.add_argument("--te", default="frozen", choices=["frozen", "train"])
    ap.add_argument("--te-layers", type=int, default=2)
    ap.add_argument("--te-zero-res", action="store_true", help="text encoder residual branches start at zero")
    ap.add_argument("--pad-mask", action="store_true", help="padding after the end token masked from attn2")
    ap.add_argument("--init", default="scratch", choices=["scratch", "v2"])
    ap.add_argument("--unet-heads", type=int, default=None)
    ap.add_argument("--xattn", default=None, help="latent sides with cross-attention, e.g. 16 or 16,8")
    ap.add_argument("--no-ff", action="store_true", help="transformer blocks' feed-forward zeroed and frozen")
    ap.add_argument("--qk-mult", type=float, default=1.0, help="learning-rate factor for every attn2 W_q, W_k")
    ap.add_argument("--hola-groups", default=None, help="comma list of mask groups in L_HOLA ('all': every group)")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--eval-people", type=int, default=32)
    ap.add_argument("--gamma", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def architecture(args) -> models.Architecture:
    """The toy architecture with the run's changes."""
    arch = models.architecture("toy")
    unet = dict(arch.unet)
    if args.unet_heads:
        unet["attention_head_dim"] = args.unet_heads   # diffusers' legacy name: the number of heads
    if args.xattn:
        sides, n = {int(x) for x in args.xattn.split(",")}, len(unet["block_out_channels"])
        res = [unet["sample_size"] // 2 ** i for i in range(n)]
        unet["down_block_types"] = tuple("CrossAttnDownBlock2D" if r in sides and i < n - 1 else "DownBlock2D"
                                         for i, r in enumerate(res))
        unet["up_block_types"] = tuple("CrossAttnUpBlock2D" if r in sides and i < n - 1 else "UpBlock2D"
                                       for i, r in reversed(list(enumerate(res))))
        unet["mid_block_type"] = "UNetMidBlock2DCrossAttn" if res[-1] in sides else "UNetMidBlock2D"
    return dataclasses.replace(arch, unet=unet, text_encoder=dict(arch.text_encoder, num_hidden_layers=args.te_layers))


def build(args, v2):
    """(unet, text encoder) to train: v2's (warm-started where the blocks match) or fresh seeded ones."""
    arch = architecture(args)
    if args.init == "v2":
        unet, te = v2.unet.float(), v2.text_encoder.float()
        if args.unet_heads or args.xattn:   # the same weights where the blocks match
            fresh = models.build_unet(arch, args.seed)
            fresh.load_state_dict(unet.state_dict(), strict=False)
            unet = fresh
    else:
        unet = models.build_unet(arch, args.seed)
        frozen_v2 = args.te_layers == 2 and args.te == "frozen"
        te = v2.text_encoder.float() if frozen_v2 else models.build_text_encoder(arch, args.seed + 2)
    if args.te_zero_res:   # each token starts as LN(token + position): distinct keys, context mixing learned
        for layer in (m for m in te.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")):
            torch.nn.init.zeros_(layer.self_attn.out_proj.weight)
            torch.nn.init.zeros_(layer.mlp.fc2.weight)
    if args.no_ff:         # no GEGLU after cross-attention: the softmax is the one multiplicative path left
        for n, m in unet.named_modules():
            if n.endswith(".ff"):
                for p in m.parameters():
                    torch.nn.init.zeros_(p)
                    p.requires_grad_(False)
    te.requires_grad_(args.te == "train")
    return unet, te


def latent_pool(n: int, vae) -> dict:
    """Toy people 0..n-1 encoded once: q(z|x) mean and std, and their annotations."""
    people = [toyworld.render(i) for i in range(n)]
    means, stds = [], []
    with torch.no_grad():
        for s in range(0, n, 256):
            x = torch.stack([torch.from_numpy(p.image).permute(2, 0, 1) for p in people[s:s + 256]]).float()
            post = vae.encode(x / 127.5 - 1).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return {"mean": torch.cat(means), "std": torch.cat(stds), "ann": [p.annotation for p in people]}


class Captions:
    """The toy preset's augmentation: body groups first, the rest shuffled, 5 % dropped, 10 % empty captions."""

    def __init__(self, tokenizer, seed: int):
        protocol = load_protocol()
        self.protocol, self.tok, self.rng = protocol, tokenizer, random.Random(seed)
        self.body = [g.name for g in protocol.groups if g.level == "body"]
        self.rest = [g.name for g in protocol.groups if g.level != "body"]
        self.empty = tokenizer("", padding="max_length", max_length=77, truncation=True).input_ids

    def __call__(self, ann) -> tuple[list[int], list[tuple[int, int]]]:
        if self.rng.random() < 0.1:
            return self.empty, [(-1, -1)] * len(MASK_NAMES)
        rest = list(self.rest)
        self.rng.shuffle(rest)
        drop = [g for g in rest if self.rng.random() < 0.05]
        d = discretize(compose(ann, self.protocol, group_order=self.body + rest, drop=drop), tokenizer=self.tok)
        return list(d.input_ids), d.spans(MASK_NAMES)


def caption_mask(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """1 on the start token, the caption and the first end token; 0 on the padding after it."""
    seen = (ids == eos).int().cumsum(1)
    return ((seen == 0) | ((seen == 1) & (ids == eos))).float()


@torch.no_grad()
def evaluate(unet, te, vae, scheduler, tokenizer, people, pad_mask: bool) -> dict:
    """Specificity, lift and the 16x16 matrix on held-out people (t = 250/500/750), the padding's share, the loss."""
    unet.eval(), te.eval()
    gen = torch.Generator().manual_seed(0)
    ds = [discretize(compose(p.annotation), tokenizer=tokenizer) for p in people]
    ids = torch.tensor([d.input_ids for d in ds])
    emb, m = te(ids)[0], caption_mask(ids, tokenizer.eos_token_id) if pad_mask else None
    x = torch.stack([torch.from_numpy(p.image).permute(2, 0, 1) for p in people]).float() / 127.5 - 1
    z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    rows, losses = [], []
    for t in (250, 500, 750):
        noise = torch.randn(z0.shape, generator=gen)
        tt = torch.full((len(people),), t, dtype=torch.long)
        with capture_cross_attention(unet, "inference", None) as store:
            pred = unet(scheduler.add_noise(z0, noise, tt), tt, emb, encoder_attention_mask=m).sample
        losses.append(float(((pred - noise) ** 2).mean()))
        for res, maps in store.token_maps().items():
            for k, (p, d) in enumerate(zip(people, ds)):
                rows += person_rows(maps[0, k], mask_set(p.parsing, sizes=(res,)), d, res, t, k)
    share = store.token_maps()[16][0].sum((-1, -2))
    share = share / share.sum(1, keepdim=True)
    a = Alignment(rows)
    groups, parts, D = a.matrix(16)
    bg = a.by_group(16)
    return {"spec16": a.specificity(16), "spec8": a.specificity(8) if 8 in a.resolutions else None,
            "lift16": sum(v["lift"] for v in bg.values()) / len(bg),
            "spec_by_group16": {g: round(v["specificity"], 3) for g, v in bg.items() if g != "body"},
            "matrix16": {"groups": groups, "parts": parts,
                         "D": [[None if np.isnan(x) else round(float(x), 3) for x in row] for row in D]},
            "pad_mass16": float((share * (1 - caption_mask(ids, tokenizer.eos_token_id))).sum(1).mean()),
            "bos_mass16": float(share[:, 0].mean()), "eval_loss": sum(losses) / len(losses)}


def record(row: dict) -> None:
    runs = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else []
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "toy_localisation", "device": "cpu-2core", "runs": runs + [row]}, indent=1))
    tmp.replace(RESULTS)   # atomic: a killed run never leaves half a file


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    v2 = models.load_toy_pipeline()
    vae, tok = v2.vae.float().eval(), v2.tokenizer
    scheduler = models.training_scheduler(v2.scheduler)
    unet, te = build(args, v2)
    pool, captions = latent_pool(args.pool, vae), Captions(tok, args.seed)
    people = held_out_people(args.eval_people)
    qk = [p for n, p in unet.named_parameters() if "attn2.to_q" in n or "attn2.to_k" in n]
    rest = [p for p in unet.parameters() if p.requires_grad and all(p is not q for q in qk)]
    groups = [{"params": rest, "lr": args.lr}, {"params": qk, "lr": args.lr * args.qk_mult}]
    if args.te == "train":
        groups.append({"params": list(te.parameters()), "lr": args.te_lr or args.lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    chosen = None if args.hola_groups in (None, "all") else torch.tensor(
        [n in args.hola_groups.split(",") for n in MASK_NAMES])
    sf, n, t0, recent, row = vae.config.scaling_factor, len(pool["ann"]), time.time(), [], {}
    unet.train(), te.train(args.te == "train")
    for step in range(1, args.steps + 1):
        warm = min(step / 200, 1.0) * 0.5 * (1 + math.cos(math.pi * max(step - 200, 0) / max(1, args.steps - 200)))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * warm
        idx = torch.randint(0, n, (args.batch,))
        z0 = sf * (pool["mean"][idx] + pool["std"][idx] * torch.randn_like(pool["mean"][idx]))
        got = [captions(pool["ann"][int(i)]) for i in idx]
        ids, spans = torch.tensor([g[0] for g in got]), torch.tensor([g[1] for g in got])
        with torch.set_grad_enabled(args.te == "train"):
            emb = te(ids)[0]
        noise = torch.randn_like(z0)
        t = (1000 * torch.rand(args.batch).pow(args.gamma)).long().clamp(0, 999)
        zt, m = scheduler.add_noise(z0, noise, t), caption_mask(ids, tok.eos_token_id) if args.pad_mask else None
        if args.hola_groups is None:
            loss = ((unet(zt, t, emb, encoder_attention_mask=m).sample - noise) ** 2).mean()
        else:
            sets = [mask_set(toyworld.render(int(i)).parsing, sizes=(16,)) for i in idx]
            present = torch.stack([s.present for s in sets]) & (spans[..., 0] >= 0)
            present = present if chosen is None else present & chosen
            with capture_cross_attention(unet, "training", (16,)) as store:
                pred = unet(zt, t, emb, encoder_attention_mask=m).sample
                lh = hola_loss(store.maps(), spans, {16: torch.stack([s.masks[16] for s in sets])}, present, HOLA)
            loss = ((pred - noise) ** 2).mean() + args.beta * lh
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-100:]
        if step % args.eval_every == 0 or step == args.steps:
            row = {"name": args.name, "step": step, "args": vars(args), "train_loss": sum(recent) / len(recent),
                   "s_per_step": (time.time() - t0) / step,
                   **evaluate(unet, te, vae, scheduler, tok, people, args.pad_mask)}
            unet.train(), te.train(args.te == "train")
            record(row)
            print(json.dumps({**row, "ratio": {"part_specificity_16": row["spec16"]}}), flush=True)
    return row


if __name__ == "__main__":
    main()
