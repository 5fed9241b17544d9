"""Eq. 3's bracket as one hand-written autograd Function: what training computes, fast on CPU and GPU.

`cosmiclite.hola.eq3_bracket` is the formula as written, the reference; `fused_eq3_bracket` here gives the same
values and gradients (tests/test_hola.py checks them against each other over the options) while reading the maps
as few times as possible and keeping no full-size temporary for backward. Use it through
`hola_terms(..., bracket=fused_eq3_bracket)`, as `cosmiclite.train` does.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Eq3Bracket", "fused_eq3_bracket"]


def _token_rows(m: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, heads, T', P) token-major maps -> (B, heads, T, P): the first T token maps as rows, contiguous along
    the pixels.

    A view when the maps are stored token-major in memory (as `cosmiclite.attention` captures them); otherwise one
    copy, since sums and maxima over pixels run several times faster along rows than down the columns of a (P, T)
    layout.
    """
    At = m[:, :, :T].to(dtype)
    return At if At.stride(-1) == 1 else At.contiguous()


def _row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, index of a maximum) along the last dimension, like `x.max(-1)` but faster on CPU.

    torch's max-with-index reduction is slow on CPU (docs/results.md, Speed and memory), so the row is first folded
    in halves
    with elementwise maxima (y_i = max_j x_(i + j w), w ~ √n, each fold vectorised), the winning i is found in the
    short folded row, and j among the n/w entries x_(i + j w). Ties may pick another maximum than `max` does: any is a
    valid (sub)gradient of the max.
    """
    n = x.shape[-1]
    y, w = x, n
    while w % 2 == 0 and w * w > n:
        w //= 2
        y = torch.maximum(y[..., :w], y[..., w:2 * w])
    peak, i = y.max(-1)                                                          # y (..., w): i the winning residue
    column = x.unflatten(-1, (n // w, w)).gather(-1, i[..., None, None].expand(*i.shape, n // w, 1))
    return peak, column.squeeze(-1).argmax(-1) * w + i


class Eq3Bracket(torch.autograd.Function):
    """The two terms inside Eq. 3's bracket, per sample, head and group, summed over pixels — with the map
    normalisation folded in and the gradient written out, so that the maps (the largest tensors of a training
    step) are read as few times as possible and no rescaled copy of them is ever made.

        tok[b,h,i] = Σ_{j∈[s_i,e_i)} ‖y_j − h_i‖²        grp[b,h,i] = ‖ȳ_i − h_i‖²,   ȳ_i = (1/n_i) Σ_{j∈[s_i,e_i)} y_j
        y_j = r_j · m_j     r_j = 1 ("none"), 1 / max_p m_j ("max"), Σ_p h_i / Σ_p m_j ("sum"): see `normalize_maps`

    inputs (`Eq3Bracket.apply(h, S, n, normalize, area, eps, *maps)`, or `fused_eq3_bracket(maps, h, S, n, ...)`):
    h (B, G, P) the masks h_i; S (B, G, T) with S[b,i,j] = 1 when token j is in group i (each token in at most one
    group); n (B, G) = e_i − s_i (tokens per group); normalize, area (B, G) = Σ_p h_i (for "sum") and eps as in
    `normalize_maps`; maps: one or more layers given token-major, M^T (B, heads_l, T_l ≥ T, P), the maps m_j as
    rows, of which the first T are read (the tokens any group has). `cosmiclite.attention` computes M^T contiguous,
    so every sum or max over pixels runs along contiguous memory (maps in another memory layout are copied once).
    The backward writes each layer's gradient once, a new tensor in that same layout at full width (zero past row
    T): what the attention's softmax backward reads (what each of these choices saves: docs/results.md, Speed).

    Why not plain autograd (`cosmiclite.hola.eq3_bracket`): (A − h)² and its mean make a full-size temporary each and
    autograd keeps one more for backward; on the toy UNet (8 heads × 77 tokens per cell against 32–128 feature
    channels) that is a large share of the whole training step, and a rescaled copy y = r·m (with amax's backward)
    more (docs/results.md).
    Here the forward reads A twice and keeps nothing new: r is a per-column scale, so Σ_p y_j² = r_j² Σ_p m_j²
    and ȳ = A·(r S/n)ᵀ; the cross term needs no pass of its own, since Σ_{j∈i} Σ_p y_j h_i = n_i Σ_p ȳ_i h_i.
    The backward writes the gradient once:

        ∂tok_i/∂y_j = 2 (y_j − h_i),   ∂grp_i/∂y_j = (2/n_i)(ȳ_i − h_i)      for j ∈ [s_i, e_i), 0 elsewhere
        => g_j := ∂L/∂y_j = 2 g_tok_i · y_j + Z_i,   Z_i = (2/n_i) g_grp_i (ȳ_i − h_i) − 2 g_tok_i h_i
        ∂L/∂m_j = r_j g_j + (Σ_p g_j m_j) ∂r_j/∂m_j,
        ∂r_j/∂m_j(p) = −r_j² at p = argmax ("max"), −r_j / Σ_p m_j ("sum")

    i.e. the per-group Z (B, heads, G, P) routed to the tokens, by one row gather (`index_select`) for raw maps or
    by one matmul with S scaled by r when rescaled (a gather would need a second pass to scale), plus one fused
    multiply-add; the rescaling's Σ_p Z_i m_j is the matmul Z Aᵀ (one read of the maps).
    The expanded form Σ y² − 2 Σ y h + Σ h² is exact in float32 for maps and masks in [0, 1] (errors ~1e-7 of the
    pixel count).
    """

    @staticmethod
    def forward(ctx, h, S, n, normalize, area, eps, *maps):
        B, G, T = S.shape
        if not maps:
            raise ValueError("Eq3Bracket needs at least one layer of maps (B, heads, T, P)")
        n1 = n.clamp_min(1)
        Sn = (S / n1[..., None]).unsqueeze(1)                                                   # (B,1,G,T)
        if normalize == "sum":
            if area is None:
                raise ValueError("Eq3Bracket(normalize='sum') needs area (B, G): Σ_p h_i per group")
            target = torch.einsum("bgt,bg->bt", S, area)[:, None]                              # Σ_p h_i of j's group
        elif normalize not in ("none", "max"):
            raise ValueError(f"normalize={normalize!r}: choose one of none, max, sum")
        a2, m_bar, r, live, top, mass = [], [], [], [], [], []
        for m in maps:   # per layer, on the token-major view At (B, heads, T, P): each map m_j a row
            At = _token_rows(m, T, h.dtype)
            a2.append(torch.linalg.vector_norm(At, dim=-1).square_())                            # Σ_p m_j²  (B,h,T)
            if normalize == "none":
                m_bar.append(Sn @ At)                                                           # ȳ_i = m̄_i (B,h,G,P)
                continue
            if normalize == "max":
                peak, i = _row_max(At)                                                          # (B,h,T)
                top.append(i)
            else:
                peak = At.sum(-1)
                mass.append(peak)
            live.append(peak > eps)
            r.append((1 if normalize == "max" else target) / peak.clamp_min(eps))
            m_bar.append((Sn * r[-1][..., None, :]) @ At)                                       # ȳ_i (B,h,G,P)
        a2, m_bar = torch.cat(a2, 1), torch.cat(m_bar, 1)
        cat = lambda xs: torch.cat(xs, 1) if xs else None                                      # noqa: E731
        r, live, top, mass = cat(r), cat(live), cat(top), cat(mass)
        h1 = h.unsqueeze(1)                                                                     # (B,1,G,P)
        d = m_bar.sub_(h1)                                                                      # ȳ_i − h_i
        grp = torch.linalg.vecdot(d, d)                                                         # ‖ȳ_i − h_i‖²
        hh = torch.linalg.vecdot(h, h)                                                          # Σ_p h_i²
        cross = torch.linalg.vecdot(d, h1) + hh[:, None]                                        # Σ_p ȳ_i h_i
        y2 = a2 if r is None else a2 * r * r                                                    # Σ_p y_j²
        # Σ_j ‖y_j − h_i‖² = Σ_j Σ_p y_j² − 2 n_i Σ_p ȳ_i h_i + n_i Σ_p h_i²
        tok = torch.einsum("bht,bgt->bhg", y2, S) - 2 * n[:, None] * cross + (n * hh)[:, None]
        ctx.normalize = normalize
        ctx.save_for_backward(d, h, S, n1, r, live, top, a2, mass, *maps)
        return tok, grp

    @staticmethod
    def backward(ctx, g_tok, g_grp):
        d, h, S, n1, r, live, top, a2, mass, *maps = ctx.saved_tensors
        none = (None,) * 6
        if not any(ctx.needs_input_grad[6:]):
            return none + (None,) * len(maps)
        B, G, T = S.shape
        h1 = h.unsqueeze(1)
        c = torch.einsum("bhg,bgt->bht", 2 * g_tok, S)    # 2 g_tok of each token's group
        S4 = S[:, None]
        # Raw maps: routing Z_i to the tokens of group i is a row gather (each token in at most one group; tokens in
        # none, and the columns past T, read an all-zero row G): one index_select writes the whole gradient.
        group = torch.where(S.any(1), S.argmax(1), G) if r is None else None                    # (B,T)
        out, at = [], 0
        for m in maps:   # layer by layer, each gradient written once into its full-width, token-major tensor
            k = slice(at, at + m.shape[1])
            at = k.stop
            hk, Tm, P = m.shape[1], m.shape[2], m.shape[3]
            Z = (2 * g_grp[:, k] / n1[:, None])[..., None] * d[:, k] - (2 * g_tok[:, k])[..., None] * h1
            At = _token_rows(m, T, h.dtype)
            if r is None:                                 # g_j = Z_i + 2 g_tok · m_j: Z_i by one row gather
                Zp = torch.cat([Z, Z.new_zeros(B, hk, 1, P)], 2)                               # row G: zeros
                first = (G + 1) * torch.arange(B * hk, device=m.device).view(B, hk, 1)          # row 0 of each (b, h)
                rows = F.pad(group, (0, Tm - T), value=G)[:, None] + first                      # (B,h,T')
                full = Zp.view(-1, P).index_select(0, rows.view(-1)).view(B, hk, Tm, P)        # Z_i of j's group
                full[:, :, :T].addcmul_(At, c[:, k, :, None])
            else:
                # g_j = Z_i + c r m_j;  Σ_p g_j m_j = Σ_p Z_i m_j + c r Σ_p m_j²;
                # ∂L/∂m_j = r g_j + (Σ_p g_j m_j) ∂r_j/∂m_j
                rk, ck = r[:, k], c[:, k]
                through_r = ((Z @ At.transpose(-1, -2)) * S4).sum(2) + ck * rk * a2[:, k]             # (B,h,T)
                full = Z.new_empty(B, hk, Tm, P)
                g = torch.matmul((S4 * rk[:, :, None]).transpose(-1, -2), Z, out=full[:, :, :T])   # r_j Z_i
                full[:, :, T:] = 0
                g.addcmul_(At, (ck * rk * rk)[..., None])                                       # + r² c m_j
                if ctx.normalize == "max":                # ∂r_j/∂m_j = −r_j² at the argmax
                    g.scatter_add_(-1, top[:, k, :, None], (-(rk * rk) * through_r * live[:, k])[..., None])
                else:                                     # ∂r_j/∂m_j = −r_j / Σ_p m_j
                    g.sub_((rk / mass[:, k].clamp_min(1e-30) * through_r * live[:, k])[..., None])
            out.append(full.to(m.dtype))                  # (B, heads, T', P), M^T's layout
        return none + tuple(out)


def fused_eq3_bracket(layers: Sequence[torch.Tensor], h: torch.Tensor, S: torch.Tensor, n: torch.Tensor,
                      normalize: str = "none", area: torch.Tensor | None = None,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """`cosmiclite.hola.eq3_bracket` by `Eq3Bracket`: the same arguments (maps (B, heads, P, T') per layer) and the
    same (tok, grp), each (B, Σ heads, G). Maps the capture hands over are views of M^T, which is read directly."""
    return Eq3Bracket.apply(h, S, n, normalize, area, eps, *(x.mT for x in layers))
