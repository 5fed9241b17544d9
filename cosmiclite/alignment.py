"""Where cross-attention goes: mass in mask, part specificity and the group x part matrix (Sec. 4.3).

HOLA (Eq. 3) pulls each caption group's cross-attention map m_(s_i,e_i) towards its mask h_i. Three ways to
read where a map is, each blind to something:

* **mass in mask** = sum_p m(p) h_i(p) / sum_p m(p), and **lift** = mass / area(h_i). A map spread over the
  whole person (a silhouette) already lifts every part inside the person: lift tells person from
  background, not one part from another.
* **part specificity** = the map's density (mass per unit area) inside its own part h_i over its density
  inside the person's *other* parts, (h_1 - h_i)+. A silhouette and a uniform map score 1; a map on its own
  part scores far above 1. This is the measure of *decomposed* attention.
* the **group x part matrix**: the density of each group's map in every part's mask of the same person,
  divided by its density over the whole person h_1. A silhouette gives a matrix of ones; localised
  attention a bright diagonal.

`attention_alignment(pipe, people)` measures all three on people with exact parsing maps (the training-time
view: the model sees a real image noised to z_t), `Alignment` aggregates them.

But: the maps are head and layer means at each resolution (what `capture_cross_attention` stores in
inference), and only groups whose mask is present in the person are measured; the body group h_1 has no
"other parts" and is left out of specificity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .attention import capture_cross_attention, group_maps, mass_in_mask
from .captions import compose
from .discretize import discretize
from .masks import mask_set
from .models import training_scheduler

BODY = "body"  # h_1, the whole person (masks.group_labels gives it every human label)


def part_densities(maps: torch.Tensor, masks: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """D[g, p] = sum_x m_g(x) h_p(x) / sum_x h_p(x): the mean of map g over part p's mask (mass per unit area).

    maps (G, h, w) non-negative, masks (P, h, w) in [0, 1] at the same size. An empty mask gives 0.
    """
    if maps.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must share (h, w): take the "
                         f"masks at the maps' resolution (mask_set(..., sizes=(res,)))")
    m, h = maps.float().flatten(-2), masks.to(maps.device).float().flatten(-2)
    return (m @ h.T) / h.sum(-1).clamp_min(eps)


def part_specificity(maps: torch.Tensor, own: torch.Tensor, person: torch.Tensor,
                     eps: float = 1e-12) -> torch.Tensor:
    """density of m_i inside h_i / density of m_i inside (h_1 - h_i)+, per group (the decomposition measure).

    maps, own (G, h, w): each group's map and its own part's mask; person (h, w): h_1. 1 for a silhouette
    (a map equal to h_1) and for a uniform map; far above 1 for a map on its own part.
    """
    rest = (person.to(own).unsqueeze(0) - own).clamp_min(0)
    m = maps.float()
    inside = (m * own).sum((-1, -2)) / own.sum((-1, -2)).clamp_min(eps)
    outside = (m * rest).sum((-1, -2)) / rest.sum((-1, -2)).clamp_min(eps)
    return (inside + eps) / (outside + eps)


def _geomean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


@dataclass
class Alignment:
    """Where attention goes, one row per (person, group, resolution, timestep).

    Row keys: `mass` (fraction of the group map's mass inside h_i), `area` (h_i's mean: what a uniform map
    scores), `specificity` (own part vs the person's other parts; None for the body group or a part that
    fills the person), `density` ({part: the map's density in that part's mask / its density in h_1}).
    """
    rows: list[dict]

    def _rows(self, res: int | None) -> list[dict]:
        return [r for r in self.rows if res is None or r.get("res") == res]

    @property
    def resolutions(self) -> list[int]:
        return sorted({r["res"] for r in self.rows if "res" in r})

    def by_group(self, res: int | None = None) -> dict[str, dict[str, float]]:
        """{group: {"mass", "area", "lift" (= mass / area: person vs background), "specificity", "n"}}."""
        out: dict[str, dict[str, float]] = {}
        rows = self._rows(res)
        for g in dict.fromkeys(r["group"] for r in rows):
            rs = [r for r in rows if r["group"] == g]
            mass, area = sum(r["mass"] for r in rs) / len(rs), sum(r["area"] for r in rs) / len(rs)
            spec = _geomean([r["specificity"] for r in rs if r.get("specificity") is not None])
            out[g] = {"mass": mass, "area": area, "lift": mass / max(area, 1e-12), "specificity": spec,
                      "n": len(rs)}
        return out

    @property
    def mean_mass(self) -> float:
        """Mean over groups (each group weighs the same, whatever its count) of the mass inside the mask."""
        g = self.by_group()
        return sum(v["mass"] for v in g.values()) / max(len(g), 1)

    @property
    def mean_lift(self) -> float:
        """Mean over groups of mass / area: 1.0 for uniform maps, above 1 where attention is on the person."""
        g = self.by_group()
        return sum(v["lift"] for v in g.values()) / max(len(g), 1)

    def specificity(self, res: int | None = None) -> float:
        """Geometric mean over the outfit groups of each group's (geometric-mean) part specificity."""
        return _geomean([v["specificity"] for g, v in self.by_group(res).items() if g != BODY])

    def matrix(self, res: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
        """(groups, parts, D): D[g, p] = mean over people of the density of group g's map in part p's mask,
        relative to its density over the whole person. Ones for a silhouette; the diagonal is localisation."""
        rows = [r for r in self._rows(res) if r.get("density")]
        groups = list(dict.fromkeys(r["group"] for r in rows))
        parts = [g for g in groups if g != BODY] or groups
        D = np.full((len(groups), len(parts)), np.nan)
        for i, g in enumerate(groups):
            for j, p in enumerate(parts):
                vals = [r["density"][p] for r in rows if r["group"] == g and p in r["density"]]
                if vals:
                    D[i, j] = float(np.mean(vals))
        return groups, parts, D

    def describe(self, res: int | None = None) -> str:
        """One sentence reading the numbers: what the maps do, at `res` (default the finest)."""
        res = res if res is not None else max(self.resolutions)
        groups = self.by_group(res)
        spec, lift = self.specificity(res), sum(v["lift"] for v in groups.values()) / max(len(groups), 1)
        if spec >= 1.5:
            what = "each group's map sits mostly on its own part"
        elif spec >= 1.15:
            what = "the groups' maps lean towards their own parts, but overlap widely"
        else:
            what = ("the groups share one map: attention lands " +
                    ("on the person, not on each part" if lift >= 1.15 else "everywhere alike, person or background"))
        return f"part specificity {spec:.2f} at {res}x{res} (lift {lift:.2f}): {what}"

    def to_dict(self) -> dict:
        finest = max(self.resolutions) if self.resolutions else None
        groups, parts, D = self.matrix(finest)
        return {"mean_mass": self.mean_mass, "mean_lift": self.mean_lift, "specificity": self.specificity(),
                "describe": self.describe() if self.resolutions else "",
                "specificity_by_res": {r: self.specificity(r) for r in self.resolutions},
                "finest": finest, "specificity_finest": self.specificity(finest) if finest else float("nan"),
                "by_group": self.by_group(),
                "matrix": {"res": finest, "groups": groups, "parts": parts,
                           "values": [[None if math.isnan(v) else round(float(v), 4) for v in row] for row in D]},
                "n_rows": len(self.rows)}


def person_rows(maps: torch.Tensor, ms, d, res: int, t: int, person: int) -> list[dict]:
    """The rows of one person at one resolution and timestep (maps: (77, r, r) token maps)."""
    named = [(g.name, g.span) for g in d.groups if g.name in ms.names and ms.present[ms.names.index(g.name)]]
    if not named:
        return []
    names = [n for n, _ in named]
    h = torch.stack([ms.mask(n, res) for n in names]).to(maps.device)
    G = group_maps(maps, [s for _, s in named], token_dim=0)
    mass = mass_in_mask(G, h)
    D = part_densities(G, h)
    body = names.index(BODY) if BODY in names else None
    spec = None
    if body is not None:
        spec = part_specificity(G, h, h[body])
        fills = (h[body].unsqueeze(0) - h).clamp_min(0).sum((-1, -2)) <= 0
    rows = []
    for i, name in enumerate(names):
        density = {}
        if body is not None:
            person_density = float(D[i, body]) or 1e-12
            density = {p: float(D[i, j]) / person_density for j, p in enumerate(names) if p != BODY}
        s = None if spec is None or name == BODY or bool(fills[i]) else float(spec[i])
        rows.append({"person": person, "group": name, "res": res, "t": int(t), "mass": float(mass[i]),
                     "area": float(h[i].mean()), "specificity": s, "density": density})
    return rows


def _training_view(pipe, people, timesteps, resolutions, gen: torch.Generator):
    """Yield (t, discretized captions, {res: (b, 77, r, r) token maps}) for people noised to z_t (the UNet sees
    each person's own image, so its parsing map is the exact mask set)."""
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    device, dtype = unet.device, unet.dtype
    scheduler = training_scheduler(pipe.scheduler)
    ds = [discretize(compose(p.annotation), tokenizer=tokenizer) for p in people]
    x = torch.stack([torch.from_numpy(p.image).permute(2, 0, 1) for p in people]).float() / 127.5 - 1
    with torch.no_grad():
        ids = torch.tensor([d.input_ids for d in ds], device=device)
        emb = text_encoder(ids)[0].to(dtype)
        z0 = vae.encode(x.to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        tt = torch.full((len(people),), int(t), device=device, dtype=torch.long)
        with torch.no_grad(), capture_cross_attention(unet, "inference", resolutions) as store:
            unet(scheduler.add_noise(z0, noise, tt).to(dtype), tt, emb)
        yield int(t), ds, {res: maps[0] for res, maps in store.token_maps().items()}


def attention_alignment(pipe, people, timesteps=(250, 500, 750), resolutions=None, seed: int = 0,
                        batch: int = 16) -> Alignment:
    """Where each caption group's cross-attention goes, on people with exact masks (Sec. 4.3).

    For each person (a `toyworld.Person`, or anything with .image, .parsing (ATR) and .annotation) the caption
    is composed and discretized, the image encoded (z_0 = the VAE posterior mean, scaled) and noised to z_t at
    each timestep (the DDPM forward process), and the UNet run once with the caption while
    `capture_cross_attention` records the maps (mean over heads and layers). Each group map m_(s_i,e_i) is
    compared with the person's masks at the map's resolution: mass in h_i, part specificity, and its density
    in every part. This is the training-time view (the model sees a real image), so the masks are exact.
    """
    gen = torch.Generator().manual_seed(seed)
    people, rows = list(people), []
    for start in range(0, len(people), batch):
        chunk = people[start:start + batch]
        for t, ds, token_maps in _training_view(pipe, chunk, timesteps, resolutions, gen):
            for res, maps in token_maps.items():
                for k, (p, d) in enumerate(zip(chunk, ds)):
                    rows += person_rows(maps[k], mask_set(p.parsing, sizes=(res,)), d, res, t, start + k)
    return Alignment(rows)


def training_view_maps(pipe, person, timesteps=(250, 500, 750), res: int | None = None, seed: int = 0):
    """One person's group maps in the training view, averaged over `timesteps`: ({group: (r, r) map}, MaskSet,
    discretized caption). Every group of the caption is drawn, those without a mask (c_other) included."""
    gen = torch.Generator().manual_seed(seed)
    acc, d = None, None
    for _, ds, token_maps in _training_view(pipe, [person], timesteps, None if res is None else (res,), gen):
        r = res if res is not None else max(token_maps)
        d, m = ds[0], token_maps[r][0]
        acc = m if acc is None else acc + m
    G = group_maps(acc / len(timesteps), [g.span for g in d.groups], token_dim=0)
    return {g.name: G[i] for i, g in enumerate(d.groups)}, mask_set(person.parsing, sizes=(r,)), d
