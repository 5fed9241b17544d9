"""HOLA — Human Body and Outfit Guided Loss for Alignment (CosmicMan, Sec. 4.3, Eq. 3 and Eq. 4).

Given the cross-attention maps m_j of every caption token j, the token spans [s_i, e_i) of the caption
groups (Sec. 4.2: C_body = c_(s1,e1), C_outfit = {c_(s2,e2) … c_(sN,eN), c_other}) and the semantic
masks h_i of those groups (h_1 = the whole person, h_2 … h_N = outfit parts), HOLA is

    L_HOLA = 1/N Σ_i ( Σ_{j∈[s_i,e_i)} ‖m_j − h_i‖²  +  ‖ (1/(e_i−s_i)) Σ_{j∈[s_i,e_i)} m_j − h_i ‖² )   (Eq. 3)

The first term pulls every token's map onto its group's region; the second asks only the *mean* map of
the group to cover the region (a word like "sleeves" need not light up the whole top, but the group
"short-sleeve red t-shirt" should). The training objective is

    L = α · L_noise + β · L_HOLA                                                                       (Eq. 4)

The paper leaves many choices open. Each one is a field of `HolaConfig` with a stated default; the
defaults follow CosmicMan's public SDXL training code (`loss.py`, `train_sdxl.py`), which settles
them in practice:

* which maps: cross-attention maps at 1/16 of the image side (64×64 at 1024 px) — `resolutions="1/16"`;
  every layer at that resolution, averaged.
* heads: the loss is taken per head, after the softmax, then averaged — `heads="per_head"`.
* normalisation: none — raw softmax probabilities against the 0/1 mask — `normalize="none"`.
  (A raw m_j sums to 1 with the other 76 tokens at each pixel, so it can only reach 1 where the
  token takes all the attention; "max" and "sum" are there to show what rescaling changes.)
* ‖·‖²: averaged over pixels (a mean squared error), not summed — `pixel_reduction="mean"`.
* how the per-token and group-mean terms are pooled: CosmicMan concatenates every token map and every
  group-mean map of a sample and takes one mean — `weighting="pooled"`. The paper's literal Eq. 3
  (sum over tokens, 1/N over groups) is `weighting="eq3"`; `"group"` gives each group equal weight.
* groups without a mask (c_other) have no h_i: they are never in the input. Groups absent from the
  caption (span −1) or from the image (`present` False) are skipped; groups whose mask is empty at a
  resolution are skipped there (`empty_masks="skip"`), so the loss stays finite and pulls nothing to 0.
* α = β = 1, and the mask loss is dropped for 10 % of samples (`drop_prob=0.1`, see `sample_keep`).

Reading order: `eq3_bracket` is Eq. 3's bracket written as the formula (the reference), `hola_terms` the batch
reduction around it with every option above, `daring_loss` Eq. 4. Training computes the same bracket with the
fused kernel of `cosmiclite.hola_fused` (`hola_terms(..., bracket=fused_eq3_bracket)`: same values and gradients).

But: maps are compared at the resolutions the caller captures; masks are resized here (bilinear, as
CosmicMan) only when the caller did not supply that resolution. Spans must not overlap (each token
belongs to at most one group) — the discretizer guarantees that, and this module checks it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["HolaConfig", "HolaTerms", "hola_loss", "hola_terms", "token_membership", "daring_loss", "normalize_maps",
           "eq3_bracket", "hola_table", "fit_maps_to_masks", "plot_hola_terms"]

Maps = Mapping[int, "torch.Tensor | Sequence[torch.Tensor]"]

_CHOICES = {
    "heads": ("per_head", "mean"),
    "normalize": ("none", "max", "sum"),
    "pixel_reduction": ("mean", "sum"),
    "weighting": ("pooled", "eq3", "group"),
    "empty_masks": ("skip", "keep"),
    "mask_resize": ("bilinear", "area"),
}


@dataclass(frozen=True)
class HolaConfig:
    """Every choice Eq. 3 / Eq. 4 leave open, with CosmicMan's public training code as the default.

    resolutions:     which captured map resolutions enter the loss: "1/16" (a fraction of the image side,
                     CosmicMan's `attn_map_size=16`; needs `image_size`), "all", or explicit sides e.g. (8, 16).
    heads:           "per_head" — loss per attention head, then averaged (CosmicMan); "mean" — average the
                     heads' maps first, then one loss.
    normalize:       how each token map m_j is scaled before the comparison: "none" (raw softmax, CosmicMan);
                     "max" — divide by its maximum over pixels; "sum" — rescale so Σ_p m_j equals the mask
                     area Σ_p h_i (same mass as the target).
    pixel_reduction: ‖·‖² "mean" over pixels (CosmicMan's MSE) or "sum" (the literal squared L2 norm).
    weighting:       "pooled" — all token terms and group-mean terms of a sample averaged together (CosmicMan);
                     "eq3" — 1/N Σ_i (Σ_j ‖m_j−h_i‖² + ‖m̄_i−h_i‖²), the paper literally;
                     "group" — like eq3 but each group's bracket divided by (e_i−s_i+1), so groups weigh equally.
    empty_masks:     "skip" a group whose mask is empty at a resolution (default) or "keep" it (target all 0).
    mask_resize:     how a mask is resized when the caller gave no mask at a map's resolution.
    alpha, beta:     the weights of Eq. 4.
    drop_prob:       probability that a sample's HOLA term is dropped (CosmicMan: 0.1); see `sample_keep`.
    eps:             guards the divisions of "max"/"sum" normalisation and the empty-mask test.
    """

    resolutions: str | tuple[int, ...] = "1/16"
    heads: Literal["per_head", "mean"] = "per_head"
    normalize: Literal["none", "max", "sum"] = "none"
    pixel_reduction: Literal["mean", "sum"] = "mean"
    weighting: Literal["pooled", "eq3", "group"] = "pooled"
    empty_masks: Literal["skip", "keep"] = "skip"
    mask_resize: Literal["bilinear", "area"] = "bilinear"
    alpha: float = 1.0
    beta: float = 1.0
    drop_prob: float = 0.1
    eps: float = 1e-6

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"HolaConfig.{name}={getattr(self, name)!r}: choose one of {allowed}")
        r = self.resolutions
        if isinstance(r, list):
            object.__setattr__(self, "resolutions", r := tuple(r))
        if isinstance(r, str):
            if r != "all" and not (r.startswith("1/") and r[2:].isdigit() and int(r[2:]) > 0):
                raise ValueError(f"HolaConfig.resolutions={r!r}: use 'all', a fraction like '1/16', "
                                 "or sides like [8, 16]")
        elif not (isinstance(r, tuple) and r and all(isinstance(x, int) and x > 0 for x in r)):
            raise ValueError(f"HolaConfig.resolutions={r!r}: use 'all', a fraction like '1/16', or sides like [8, 16]")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"HolaConfig.drop_prob={self.drop_prob}: must lie in [0, 1]")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"HolaConfig alpha={self.alpha}, beta={self.beta}: Eq. 4 weights must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "HolaConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"hola: unknown key(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**d)   # lists (from YAML or JSON) become tuples in __post_init__

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["resolutions"], tuple):
            d["resolutions"] = list(d["resolutions"])
        return d

    def capture_options(self) -> dict:
        """The `attention.capture_cross_attention(unet, "training", ...)` options these choices need."""
        return {"head_mean": self.heads == "mean"}

    def sides(self, available: Sequence[int], image_size: int | None = None) -> list[int]:
        """The map sides that enter the loss, checked against the captured ones."""
        available = sorted(int(a) for a in available)
        if self.resolutions == "all":
            return available
        if isinstance(self.resolutions, str):
            if image_size is None:
                raise ValueError(f"HolaConfig.resolutions={self.resolutions!r} is a fraction of the image side: "
                                 "pass image_size=, or give explicit sides like resolutions=(16,)")
            wanted = [image_size // int(self.resolutions[2:])]
        else:
            wanted = list(self.resolutions)
        missing = [w for w in wanted if w not in available]
        if missing:
            raise ValueError(f"HOLA wants attention maps at {missing} but only {available} were captured: "
                             "set hola.resolutions to captured sides (or capture those layers)")
        return wanted

    def sample_keep(self, batch_size: int, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", *, uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) bool: which samples keep their HOLA term this step (CosmicMan drops it for 10 %).

        uniforms: the (B,) draws in [0, 1) to use instead of drawing from `generator`; training passes draws keyed
        by each sample's position, so that a resumed or data-parallel run drops the same samples."""
        u = torch.rand(batch_size, generator=generator) if uniforms is None else uniforms
        return (u >= self.drop_prob).to(device)


@dataclass
class HolaTerms:
    """The loss and its parts (for logging and the notebooks).

    loss:       the reduced L_HOLA (a scalar tensor with grad).
    token_term: mean of the per-token errors ‖m_j − h_i‖² over all (sample, layer, head, token) kept.
    group_term: mean of the group-mean errors ‖m̄_i − h_i‖² over all (sample, layer, head, group) kept.
    n_groups:   number of (sample, resolution, group) triples that entered the loss.
    n_samples:  number of samples with at least one group in the loss (the batch mean's denominator).
    """

    loss: torch.Tensor
    token_term: torch.Tensor
    group_term: torch.Tensor
    n_groups: int
    n_samples: int


def token_membership(spans: torch.Tensor, num_tokens: int = 77) -> torch.Tensor:
    """(B,G,2) half-open spans (−1 = absent) -> (B,G,T) bool, W[b,i,j] = s_i <= j < e_i.

    One comparison against an arange: no Python loop over tokens.
    """
    if spans.ndim != 3 or spans.shape[-1] != 2:
        raise ValueError(f"spans must have shape (B, G, 2), got {tuple(spans.shape)}")
    s, e = spans[..., 0:1].long(), spans[..., 1:2].long()
    if (e > num_tokens).any():
        raise ValueError(f"spans end past the {num_tokens} tokens of the maps: max end {int(e.max())}")
    j = torch.arange(num_tokens, device=spans.device)
    return (s >= 0) & (j >= s) & (j < e)


def _layers(m: "torch.Tensor | Sequence[torch.Tensor]", res: int) -> list[torch.Tensor]:
    """Captured maps at one resolution -> a list of (B, heads, P, T) tensors, one per layer (views, no copies)."""
    if isinstance(m, (list, tuple)):
        if not m:
            raise ValueError(f"maps[{res}] is an empty list: no layer was captured at that resolution")
        layers = [x if x.ndim == 4 else x.unsqueeze(1) for x in m]
    elif m.ndim == 5:
        layers = list(m.unbind(0))    # stacked (L, B, heads, P, T)
    elif m.ndim == 3:
        layers = [m.unsqueeze(1)]     # one layer, heads already averaged
    else:
        layers = [m]                  # one layer
    for x in layers:
        if x.ndim != 4 or x.shape[2] != res * res:
            raise ValueError(f"maps[{res}] must be (B, heads, {res}*{res}, T), a list of those, or a stack of them "
                             f"(L, ...); got {tuple(x.shape)}")
    return layers


def _masks_at(masks: Mapping[int, torch.Tensor], res: int, mode: str) -> torch.Tensor:
    """(B,G,res,res) masks at `res`: the caller's if given, else resized from the nearest larger one."""
    if res in masks:
        return masks[res]
    larger = sorted(k for k in masks if k > res) or sorted(masks, reverse=True)
    if not larger:
        raise ValueError("masks is empty: HOLA needs masks {side: (B, G, side, side)}")
    src = masks[larger[0]].float()
    return F.interpolate(src, size=(res, res), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


def normalize_maps(A: torch.Tensor, mode: str, S: torch.Tensor | None = None, area: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
    """Rescale each token map m_j (over pixels, per layer and head) before Eq. 3 compares it with its mask.

    A: (B, heads, P, T) maps. mode "none": the raw softmax shares (CosmicMan). "max": m_j / max_p m_j, so every
    map peaks at 1 like a mask does. "sum": m_j · (Σ_p h_i / Σ_p m_j), the mass of its group's mask (needs S, the
    (B, G, T) token-in-group weights, and area, the (B, G) mask areas Σ_p h_i); tokens in no group become 0.
    Why it matters: at every pixel the 77 raw maps sum to 1, so where several tokens' targets are 1 they must share,
    and no raw map reaches a 0/1 mask; rescaling lifts that ceiling (and lets the loss ignore how much
    attention a token takes overall, only where).
    """
    if mode == "none":
        return A
    if mode == "max":
        return A / A.amax(2, keepdim=True).clamp_min(eps)
    if mode == "sum":
        if S is None or area is None:
            raise ValueError("normalize_maps(mode='sum') needs S (B, G, T) and area (B, G): the target mass per token")
        target_mass = torch.einsum("bgt,bg->bt", S.to(A.dtype), area.to(A.dtype))   # Σ_p h_i of token j's group
        return A * (target_mass[:, None, None, :] / A.sum(2, keepdim=True).clamp_min(eps))
    raise ValueError(f"normalize={mode!r}: choose one of {_CHOICES['normalize']}")


def eq3_bracket(layers: Sequence[torch.Tensor], h: torch.Tensor, S: torch.Tensor, n: torch.Tensor,
                normalize: str = "none", area: torch.Tensor | None = None,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms inside Eq. 3's bracket, per sample, layer-head and group, summed over pixels: the reference.

        tok_i = Σ_{j∈[s_i,e_i)} ‖y_j − h_i‖²        grp_i = ‖ȳ_i − h_i‖²,   ȳ_i = 1/(e_i−s_i) Σ_{j∈[s_i,e_i)} y_j
        y_j = m_j, rescaled as `normalize_maps` says

    layers: the maps m, one (B, heads, P, T') tensor per layer, of which the first T = S.shape[-1] tokens are read;
    h (B, G, P) the masks h_i; S (B, G, T) with S[b,i,j] = 1 when token j is in group i (each token in at most one
    group); n (B, G) = e_i − s_i; area (B, G) = Σ_p h_i (for "sum"). Returns (tok, grp), each (B, Σ heads, G).
    `cosmiclite.hola_fused.fused_eq3_bracket` computes the same in fewer passes over the maps (what training
    uses; tests/test_hola.py checks both agree in value and gradient).
    """
    T = S.shape[-1]
    S = S.to(h.dtype)
    h_j = torch.einsum("bgt,bgp->btp", S, h)[:, None]                 # (B,1,T,P) the mask h_i of token j's group
    tok, grp = [], []
    for m in layers:
        y = normalize_maps(m[..., :T].to(h.dtype), normalize, S, area, eps).mT        # y_j as rows: (B,H,T,P)
        tok.append(torch.einsum("bhtp,bgt->bhg", (y - h_j) ** 2, S))                  # Σ_j ‖y_j − h_i‖²
        y_bar = (S / n.clamp_min(1)[..., None])[:, None] @ y                          # ȳ_i: (B,H,G,P)
        grp.append(((y_bar - h[:, None]) ** 2).sum(-1))                              # ‖ȳ_i − h_i‖²
    return torch.cat(tok, 1), torch.cat(grp, 1)


Bracket = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def hola_terms(maps: Maps, spans: torch.Tensor, masks: Mapping[int, torch.Tensor], present: torch.Tensor,
               config: HolaConfig | None = None, *, image_size: int | None = None,
               keep: torch.Tensor | None = None, bracket: Bracket = eq3_bracket) -> HolaTerms:
    """Eq. 3 over a batch, vectorised, computed in float32 (float64 if the maps are float64).

    maps:    {side: (B, heads, side*side, T)} softmax cross-attention maps M, a list of them per layer, or
             stacked (L, B, heads, side*side, T): what `TrainingStore.maps()` hands over.
    spans:   (B, G, 2) token spans [s_i, e_i) of the G mask groups (−1 where a group is absent).
    masks:   {side: (B, G, side, side)} semantic masks h_i in [0, 1].
    present: (B, G) bool, group i is visible in the image.
    keep:    (B,) bool, samples whose HOLA term counts (from `HolaConfig.sample_keep`); None = all.
    bracket: how Eq. 3's bracket is computed: `eq3_bracket` (the formula as written) or
             `cosmiclite.hola_fused.fused_eq3_bracket` (the same values and gradients, fewer passes: training's).
    """
    cfg = config or HolaConfig()
    if not maps:
        raise ValueError("maps is empty: capture cross-attention maps in training mode first")
    B, G = spans.shape[:2]
    if present.shape != (B, G):
        raise ValueError(f"present must be (B, G) = {(B, G)} like spans, got {tuple(present.shape)}")
    sides = cfg.sides(list(maps), image_size)
    first = _layers(maps[sides[0]], sides[0])[0]
    T, device = first.shape[3], first.device
    dtype = torch.promote_types(first.dtype, torch.float32)   # fp16/bf16 maps: the loss in fp32
    W = token_membership(spans.to(device), T)                          # (B,G,T)
    if (W.sum(1) > 1).any():
        raise ValueError("spans overlap: a token belongs to two groups; group spans must be disjoint")
    ok = present.to(device).bool() & W.any(-1)                         # group in caption and image
    # Only tokens up to the last span end can get a gradient: the maps are read up to there (captions fill ~half
    # of the 77 tokens), which spares the loss's passes over the padding columns.
    used = W.any(1).any(0).nonzero()
    Tc = int(used.max()) + 1 if len(used) else 1
    W = W[..., :Tc]
    if keep is not None:
        ok = ok & keep.to(device).bool()[:, None]

    per_sample_sum = torch.zeros(B, dtype=dtype, device=device)        # Σ over (layer, head) entries
    per_sample_cnt = torch.zeros(B, dtype=dtype, device=device)
    tok_sum = grp_sum = torch.zeros((), dtype=dtype, device=device)
    tok_cnt = grp_cnt = 0.0
    n_groups = 0
    for res in sides:
        layers = _layers(maps[res], res)
        P = res * res
        h = _masks_at(masks, res, cfg.mask_resize).to(device, dtype)
        if h.shape != (B, G, res, res):
            raise ValueError(f"masks[{res}] must be (B, G, {res}, {res}) = {(B, G, res, res)}, got {tuple(h.shape)}")
        h = h.reshape(B, G, P)
        area = h.sum(-1)                                               # (B,G) Σ_p h_i
        valid = ok & (area > cfg.eps) if cfg.empty_masks == "skip" else ok
        S = (W & valid[..., None]).to(dtype)                           # (B,G,T) tokens that count
        n = S.sum(-1)                                                  # (B,G) e_i − s_i
        N = valid.sum(-1).to(dtype)                                    # (B,) groups in the loss
        has = (N > 0).to(dtype)                                        # (B,)
        n_groups += int(valid.sum())
        vmask = valid.to(dtype)[:, None]                               # (B,1,G)
        if cfg.heads == "mean":   # averaged in the maps' own memory layout (mT: M^T as the capture stores it)
            layers = [x.mT[:, :, :Tc].mean(1, keepdim=True).mT for x in layers]
        # Eq. 3's bracket per (sample, layer-head, group): Σ_j ‖m_j − h_i‖² and ‖m̄_i − h_i‖², pixel sums, each m_j
        # first rescaled as cfg.normalize says; every layer of this resolution in one call, heads side by side.
        e_tok, e_grp = bracket(layers, h, S, n, cfg.normalize, area, cfg.eps)   # (B,H,G) each, H = Σ heads
        H = e_tok.shape[1]
        if cfg.pixel_reduction == "mean":                              # ‖·‖² averaged over pixels (an MSE)
            e_tok, e_grp = e_tok / P, e_grp / P
        e_tok, e_grp = e_tok * vmask, e_grp * vmask

        if cfg.weighting == "pooled":        # CosmicMan: one mean over all token and group-mean maps
            per_bh = (e_tok.sum(-1) + e_grp.sum(-1)) / (n.sum(-1) + N).clamp_min(1)[:, None]
        else:
            bracket_i = e_tok + e_grp                                  # Σ_j ‖m_j−h_i‖² + ‖m̄_i−h_i‖²
            if cfg.weighting == "group":
                bracket_i = bracket_i / (n + 1)[:, None]
            per_bh = bracket_i.sum(-1) / N.clamp_min(1)[:, None]       # 1/N Σ_i
        per_sample_sum = per_sample_sum + per_bh.sum(1) * has
        per_sample_cnt = per_sample_cnt + H * has
        tok_sum = tok_sum + e_tok.sum()
        grp_sum = grp_sum + e_grp.sum()
        tok_cnt += float(n.sum()) * H
        grp_cnt += float(N.sum()) * H

    counted = per_sample_cnt > 0
    n_samples = int(counted.sum())
    if n_samples == 0:
        # A zero that still hangs on the graph keeps backward() and DDP happy when no group counts.
        zero = first.to(dtype).sum() * 0.0
        return HolaTerms(zero, zero, zero, 0, 0)
    loss = (per_sample_sum[counted] / per_sample_cnt[counted]).mean()
    return HolaTerms(loss, tok_sum / max(tok_cnt, 1.0), grp_sum / max(grp_cnt, 1.0), n_groups, n_samples)


def hola_loss(maps: Maps, spans: torch.Tensor, masks: Mapping[int, torch.Tensor], present: torch.Tensor,
              config: HolaConfig | None = None, *, image_size: int | None = None,
              keep: torch.Tensor | None = None, bracket: Bracket = eq3_bracket) -> torch.Tensor:
    """L_HOLA (Eq. 3) as a scalar; see `hola_terms` for the arguments."""
    return hola_terms(maps, spans, masks, present, config, image_size=image_size, keep=keep, bracket=bracket).loss


def daring_loss(noise_loss: torch.Tensor, hola: torch.Tensor | float, config: HolaConfig) -> torch.Tensor:
    """Eq. 4: L = α · L_noise + β · L_HOLA."""
    return config.alpha * noise_loss + config.beta * hola


# ------------------------------------------------------------------------------------------ teaching helpers
# What notebook 05 shows: the numbers inside Eq. 3 for one sample, maps moved onto masks by HOLA alone, a figure.

def _sample_maps(maps: Maps, spans: torch.Tensor, masks: Mapping[int, torch.Tensor], present: torch.Tensor,
                 cfg: HolaConfig, res: int, sample: int):
    """One sample's maps as the loss sees them at `res`: (layers·heads, P, T) after head averaging and
    normalisation, with its masks (G, P), the groups that count (G,) and their mask areas (G,)."""
    layers = [x[sample:sample + 1].detach().float() for x in _layers(maps[res], res)]
    if cfg.heads == "mean":
        layers = [x.mean(1, keepdim=True) for x in layers]
    A = torch.cat([x[0] for x in layers])                             # (LH, P, T)
    T, P, G = A.shape[-1], res * res, spans.shape[1]
    h = _masks_at(masks, res, cfg.mask_resize)[sample].float().reshape(G, P)
    area = h.sum(-1)
    W = token_membership(spans[sample:sample + 1], T)[0]              # (G, T)
    valid = present[sample].bool() & W.any(-1)
    if cfg.empty_masks == "skip":
        valid = valid & (area > cfg.eps)
    S = (W & valid[:, None]).float()
    A = normalize_maps(A[:, None], cfg.normalize, S[None], area[None], cfg.eps)[:, 0]
    return A, h, valid, area


def hola_table(maps: Maps, spans: torch.Tensor, masks: Mapping[int, torch.Tensor], present: torch.Tensor,
               config: HolaConfig | None = None, *, res: int | None = None, sample: int = 0,
               names: Sequence[str] | None = None, tokens: Sequence[str] | None = None) -> list[dict]:
    """The numbers inside Eq. 3 for one sample, one row per group: each token's ‖m_j − h_i‖², their sum (the
    first term), the group-mean term ‖m̄_i − h_i‖², the bracket, and whether the group counts in the loss.

    Values follow the config (normalisation, pixel mean or sum) and are averaged over the layers and heads at
    `res` (default: the largest captured side). With one layer and one head, "pooled" L_HOLA is
    (Σ first terms + Σ second terms) / (tokens + groups) over the rows that count, and "eq3" is the mean bracket.
    """
    cfg = config or HolaConfig(resolutions="all")
    res = res if res is not None else max(maps)
    A, h, valid, area = _sample_maps(maps, spans, masks, present, cfg, res, sample)   # (LH, P, T), (G, P)
    P, G = res * res, spans.shape[1]
    red = (lambda x: x.mean(-1)) if cfg.pixel_reduction == "mean" else (lambda x: x.sum(-1))   # over pixels
    rows = []
    for i in range(G):
        s, e = (int(v) for v in spans[sample, i])
        if s < 0:
            continue
        m = A[:, :, s:e].permute(0, 2, 1)                             # (LH, n_i, P) the group's token maps
        per_token = red((m - h[i]) ** 2).mean(0)                      # ‖m_j − h_i‖², mean over layers/heads
        second = red((m.mean(1) - h[i]) ** 2).mean(0)                 # ‖m̄_i − h_i‖²
        first = per_token.sum()
        words = [tokens[j] if tokens is not None else str(j) for j in range(s, e)]
        rows.append({"group": names[i] if names is not None else i, "span": (s, e), "tokens": " ".join(words),
                     "per-token ‖m_j−h_i‖²": " ".join(f"{v:.3f}" for v in per_token.tolist()),
                     "first term Σ_j": round(float(first), 4), "second term ‖m̄_i−h_i‖²": round(float(second), 4),
                     "bracket": round(float(first + second), 4), "mask area": round(float(area[i]) / P, 3),
                     "counts": bool(valid[i])})
    return rows


def fit_maps_to_masks(spans: torch.Tensor, masks: Mapping[int, torch.Tensor], present: torch.Tensor,
                      config: HolaConfig | None = None, *, num_tokens: int = 77, heads: int = 1, steps: int = 200,
                      lr: float = 0.1, seed: int = 0) -> dict:
    """HOLA alone, on free maps: gradient descent (Adam) on attention logits, maps = softmax over the tokens.

    What HOLA does to a UNet's cross-attention with the UNet taken away: the maps of each group's tokens move
    onto the group's mask, as far as the softmax allows (the T maps share each pixel's unit of attention).
    masks {side: (B, G, side, side)} (one side); returns {"initial": maps, "final": maps ({side: (B, heads,
    side², T)}), "losses": [L_HOLA per step]}.
    """
    cfg = config or HolaConfig(resolutions="all", drop_prob=0.0)
    if len(masks) != 1:
        raise ValueError(f"fit_maps_to_masks takes masks at one side, got sides {sorted(masks)}")
    (res, m), = masks.items()
    B = m.shape[0]
    g = torch.Generator().manual_seed(seed)
    logits = (0.1 * torch.randn(B, heads, res * res, num_tokens, generator=g)).requires_grad_()
    opt = torch.optim.Adam([logits], lr=lr)
    initial = {res: logits.detach().softmax(-1)}
    losses = []
    for _ in tqdm(range(steps), desc="descent on L_HOLA", leave=False):
        loss = hola_loss({res: logits.softmax(-1)}, spans, masks, present, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"initial": initial, "final": {res: logits.detach().softmax(-1)}, "losses": losses}


def plot_hola_terms(maps: Maps, spans: torch.Tensor, masks: Mapping[int, torch.Tensor], present: torch.Tensor,
                    config: HolaConfig | None = None, *, res: int | None = None, sample: int = 0,
                    names: Sequence[str] | None = None, tokens: Sequence[str] | None = None, image=None,
                    groups: Sequence[int | str] | None = None, max_tokens: int = 6, vmax: float | None = 1.0,
                    title: str | None = None):
    """One row per group i: its mask h_i (over `image` if given), its token maps m_j, and their mean m̄_i — each
    panel titled with its term of Eq. 3 (‖m_j − h_i‖², ‖m̄_i − h_i‖², config's pixel reduction), maps averaged
    over layers and heads at `res`. vmax=1 draws maps on the masks' 0..1 scale, so weak raw softmax maps look
    weak (None: each panel on its own scale); with normalize "max"/"sum" the maps are drawn rescaled, as compared.
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt  # noqa: PLC0415  (lazy: matplotlib only for the figure)

    cfg = config or HolaConfig(resolutions="all")
    res = res if res is not None else max(maps)
    rows = hola_table(maps, spans, masks, present, cfg, res=res, sample=sample, names=names, tokens=tokens)
    if groups is not None:
        rows = [r for k, r in enumerate(rows) if r["group"] in groups or k in groups]
    if not rows:
        raise ValueError("no group of this sample has a span in the caption: nothing to draw")
    A, h, _, _ = _sample_maps(maps, spans, masks, present, cfg, res, sample)
    A = A.mean(0)                                                     # (P, T), mean over layers and heads
    gi = {(names[i] if names is not None else i): i for i in range(spans.shape[1])}
    h = h.reshape(-1, res, res)
    ncol = 2 + min(max_tokens, max(r["span"][1] - r["span"][0] for r in rows))
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.55 * ncol, 1.9 * len(rows) + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        i, (s, e) = gi[row["group"]], row["span"]
        mask = h[i].numpy()
        ax = axes[r, 0]
        if image is not None:
            up = np.kron(mask, np.ones((image.shape[0] // res, image.shape[1] // res)))
            ax.imshow(image)
            ax.imshow(up, cmap="gray", alpha=0.6, vmin=0, vmax=1)
        else:
            ax.imshow(mask, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"h: {row['group']}" + ("" if row["counts"] else "\n(not counted)"), fontsize=8)
        errs = row["per-token ‖m_j−h_i‖²"].split()
        for c, j in enumerate(range(s, min(e, s + max_tokens)), start=1):
            axes[r, c].imshow(A[:, j].reshape(res, res).numpy(), cmap="magma", vmin=0, vmax=vmax)
            word = tokens[j] if tokens is not None else f"token {j}"
            axes[r, c].set_title(f"{word}\n‖m−h‖²={float(errs[j - s]):.3f}", fontsize=7)
        m_bar = A[:, s:e].mean(-1).reshape(res, res).numpy()
        axes[r, -1].imshow(m_bar, cmap="magma", vmin=0, vmax=vmax)
        axes[r, -1].set_title(f"mean m̄\n‖m̄−h‖²={row['second term ‖m̄_i−h_i‖²']:.3f}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    fig.suptitle(title or f"Eq. 3 terms at {res}x{res} (normalize={cfg.normalize}, pixel {cfg.pixel_reduction})",
                 fontsize=9)
    fig.tight_layout()
    return fig
