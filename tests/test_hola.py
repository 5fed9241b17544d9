"""HOLA (Eq. 3): a hand-worked example, a gradient check, edge cases and each option's effect."""
import math

import matplotlib
import pytest
import torch

from cosmiclite.attention import capture_cross_attention, mass_in_mask
from cosmiclite.hola import (
    HolaConfig,
    daring_loss,
    eq3_bracket,
    fit_maps_to_masks,
    hola_loss,
    hola_table,
    hola_terms,
    plot_hola_terms,
    token_membership,
)
from cosmiclite.hola_fused import _row_max, fused_eq3_bracket
from cosmiclite.models import build_unet


def hand_example(dtype=torch.float32):
    """One sample, one layer, one head, 2x2 maps (P = 4 pixels, row-major), T = 4 tokens, G = 2 groups.

    Group 0 = tokens [1, 3), mask h0 = [1, 1, 0, 0];   group 1 = token [3, 4), mask h1 = [0, 0, 1, 0].
    Token maps over the 4 pixels:  m0 = [.5 .5 .5 .5] (no group)   m1 = [1 0 0 0]
                                   m2 = [.5 .5 0 0]                m3 = [0 0 .5 .5]
    Squared errors (sum over pixels | mean over pixels):
      ‖m1 − h0‖² : diff [0 −1 0 0]          -> 1     | 1/4
      ‖m2 − h0‖² : diff [−.5 −.5 0 0]       -> 1/2   | 1/8
      m̄0 = (m1 + m2)/2 = [.75 .25 0 0], ‖m̄0 − h0‖² : diff [−.25 −.75 0 0] -> 5/8 | 5/32
      ‖m3 − h1‖² : diff [0 0 −.5 .5]        -> 1/2   | 1/8
      m̄1 = m3                               -> 1/2   | 1/8
    Eq. 3 literal ("eq3", pixel sum):  1/2 · [(1 + 1/2 + 5/8) + (1/2 + 1/2)] = 1/2 · 25/8 = 25/16
    "eq3", pixel mean:                 1/2 · [(1/4 + 1/8 + 5/32) + (1/8 + 1/8)] = 1/2 · 25/32 = 25/64
    "group", pixel mean:               1/2 · [(17/32)/3 + (8/32)/2] = 29/192
    "pooled" (CosmicMan), pixel mean:  (1/4 + 1/8 + 5/32 + 1/8 + 1/8) / 5 = (25/32)/5 = 5/32
    """
    m = torch.tensor([[.5, 1, .5, 0],
                      [.5, 0, .5, 0],
                      [.5, 0, 0, .5],
                      [.5, 0, 0, .5]], dtype=dtype)            # (P, T)
    maps = {2: m[None, None]}                                   # (B=1, heads=1, P=4, T=4)
    spans = torch.tensor([[[1, 3], [3, 4]]])
    masks = {2: torch.tensor([[[[1., 1.], [0., 0.]], [[0., 0.], [1., 0.]]]], dtype=dtype)}
    present = torch.tensor([[True, True]])
    return maps, spans, masks, present


@pytest.mark.parametrize("weighting,pixel,expected", [
    ("eq3", "sum", 25 / 16),
    ("eq3", "mean", 25 / 64),
    ("group", "mean", 29 / 192),
    ("pooled", "mean", 5 / 32),
])
def test_hand_worked_example(weighting, pixel, expected):
    cfg = HolaConfig(resolutions="all", weighting=weighting, pixel_reduction=pixel)
    loss = hola_loss(*hand_example(), cfg)
    assert loss.item() == pytest.approx(expected, abs=1e-7)


def test_terms_of_hand_example():
    t = hola_terms(*hand_example(), HolaConfig(resolutions="all"))
    # token terms (mean over pixels): 1/4, 1/8, 1/8 -> mean 1/6; group terms 5/32, 1/8 -> mean 9/64
    assert t.token_term.item() == pytest.approx(1 / 6)
    assert t.group_term.item() == pytest.approx(9 / 64)
    assert (t.n_groups, t.n_samples) == (2, 1)


def test_token_membership():
    W = token_membership(torch.tensor([[[1, 3], [-1, -1], [5, 6]]]), 7)
    assert W.tolist() == [[[False, True, True, False, False, False, False],
                           [False] * 7,
                           [False, False, False, False, False, True, False]]]
    with pytest.raises(ValueError, match="past"):
        token_membership(torch.tensor([[[70, 80]]]), 77)


@pytest.mark.parametrize("cfg", [
    HolaConfig(resolutions="all"),
    HolaConfig(resolutions="all", weighting="eq3", pixel_reduction="sum", heads="mean"),
    HolaConfig(resolutions="all", normalize="max"),
    HolaConfig(resolutions="all", normalize="sum", weighting="group"),
])
def test_gradcheck(cfg):
    g = torch.Generator().manual_seed(0)
    B, H, T, G = 2, 2, 8, 3          # spans end at 6: the loss slices the last two (padding) columns away
    maps = {2: torch.rand(B, H, 4, T, generator=g, dtype=torch.float64).softmax(-1).requires_grad_(),
            4: [torch.rand(B, 1, 16, T, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()]}
    spans = torch.tensor([[[1, 3], [3, 4], [-1, -1]], [[1, 2], [2, 5], [5, 6]]])
    masks = {4: (torch.rand(B, G, 4, 4, generator=g) > 0.5).double()}
    present = torch.tensor([[True, True, False], [True, True, True]])
    fn = lambda a, b: hola_loss({2: a, 4: [b]}, spans, masks, present, cfg)
    assert torch.autograd.gradcheck(fn, (maps[2], maps[4][0]))


def test_empty_mask_no_groups_zero_maps_are_finite():
    maps, spans, masks, present = hand_example()
    cfg = HolaConfig(resolutions="all", normalize="sum")
    # empty mask for group 1: skipped by default -> only group 0 counts
    empty = {2: masks[2].clone()}
    empty[2][0, 1] = 0
    only0 = hola_loss(maps, spans, empty, present, HolaConfig(resolutions="all"))
    assert only0.item() == pytest.approx((1 / 4 + 1 / 8 + 5 / 32) / 3)
    kept = hola_loss(maps, spans, empty, present, HolaConfig(resolutions="all", empty_masks="keep"))
    assert kept.item() != pytest.approx(only0.item())
    # no groups at all (absent spans / not present): a finite zero that still backpropagates
    m = maps[2].clone().requires_grad_()
    z = hola_loss({2: m}, torch.full((1, 2, 2), -1), masks, present, cfg)
    z.backward()
    assert z.item() == 0 and m.grad is not None and torch.isfinite(m.grad).all()
    # all-zero maps with every normalisation
    for norm in ("none", "max", "sum"):
        zm = torch.zeros_like(maps[2]).requires_grad_()
        v = hola_loss({2: zm}, spans, empty, present, HolaConfig(resolutions="all", normalize=norm))
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(zm.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_maps_give_fp32_loss(dtype):
    maps, spans, masks, present = hand_example(dtype)
    loss = hola_loss(maps, spans, masks, present, HolaConfig(resolutions="all"))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(5 / 32, abs=1e-3)


def test_options_change_the_loss():
    g = torch.Generator().manual_seed(1)
    maps = {4: torch.rand(2, 3, 16, 8, generator=g).softmax(-1), 8: torch.rand(2, 3, 64, 8, generator=g).softmax(-1)}
    spans = torch.tensor([[[1, 3], [3, 6]], [[1, 4], [-1, -1]]])
    masks = {8: (torch.rand(2, 2, 8, 8, generator=g) > 0.4).float()}
    present = torch.ones(2, 2, dtype=torch.bool)
    L = lambda **kw: hola_loss(maps, spans, masks, present, HolaConfig(**kw), image_size=128).item()
    base = L()                                   # "1/16" of 128 px -> the 8x8 maps
    assert base == pytest.approx(L(resolutions=(8,)))
    assert base != pytest.approx(L(resolutions=(4,)))            # 4x4: masks resized from 8x8
    assert L(resolutions="all") != pytest.approx(base)
    # heads: the mean of per-head squared errors >= the error of the head-mean map (Jensen), strictly here
    assert L(heads="per_head") > L(heads="mean")
    assert L(pixel_reduction="sum") == pytest.approx(64 * base)   # one resolution: sum = P · mean
    for kw in ({"normalize": "max"}, {"normalize": "sum"}, {"weighting": "eq3"}, {"weighting": "group"}):
        assert L(**kw) != pytest.approx(base), kw
    # dropping a sample (keep) removes its term from the mean
    only0 = hola_loss(maps, spans, masks, present, HolaConfig(resolutions=(8,)), keep=torch.tensor([True, False]))
    solo = hola_loss({8: maps[8][:1]}, spans[:1], {8: masks[8][:1]}, present[:1], HolaConfig(resolutions=(8,)))
    assert only0.item() == pytest.approx(solo.item())


def test_sample_keep_rate_and_daring():
    cfg = HolaConfig()
    keep = cfg.sample_keep(20000, torch.Generator().manual_seed(0))
    assert 0.88 < keep.float().mean().item() < 0.92
    assert HolaConfig(drop_prob=0.0).sample_keep(10).all()
    cfg2 = HolaConfig(alpha=2.0, beta=0.5)
    assert daring_loss(torch.tensor(1.0), torch.tensor(4.0), cfg2).item() == 4.0


def test_bad_inputs_raise_clear_errors():
    maps, spans, masks, present = hand_example()
    with pytest.raises(ValueError, match="weighting"):
        HolaConfig(weighting="sometimes")
    with pytest.raises(ValueError, match="unknown key"):
        HolaConfig.from_dict({"alfa": 1})
    with pytest.raises(ValueError, match="image_size"):
        hola_loss(maps, spans, masks, present)                   # "1/16" needs the image side
    with pytest.raises(ValueError, match="captured"):
        hola_loss(maps, spans, masks, present, HolaConfig(resolutions=(16,)))
    with pytest.raises(ValueError, match="overlap"):
        hola_loss(maps, torch.tensor([[[1, 3], [2, 4]]]), masks, present, HolaConfig(resolutions="all"))
    with pytest.raises(ValueError, match="masks"):
        hola_loss(maps, spans, {2: masks[2][:, :1]}, present, HolaConfig(resolutions="all"))
    assert math.isclose(HolaConfig.from_dict({"resolutions": [8, 16]}).to_dict()["resolutions"][1], 16)


def _bracket_inputs(seed, B=2, P=9, T=7, G=3, heads=(3,), width=None):
    g = torch.Generator().manual_seed(seed)
    layers = [torch.rand(B, H, P, width or T, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
              for H in heads]
    h = (torch.rand(B, G, P, generator=g) > 0.5).double()
    spans = torch.tensor([[[1, 3], [3, 4], [-1, -1]], [[0, 2], [2, 5], [5, 7]]])[:, :G]
    W = token_membership(spans, T).double()
    return layers, h, W, W.sum(-1), h.sum(-1), g


def test_eq3_bracket_reference_is_the_formula_written_out():
    """The reference bracket equals Eq. 3's two terms computed token by token and group by group, in loops."""
    layers, h, W, n, _, _ = _bracket_inputs(3)
    tok, grp = eq3_bracket(layers, h, W, n)
    A = layers[0].detach()
    for b in range(A.shape[0]):
        for k in range(A.shape[1]):
            for i in range(W.shape[1]):
                js = W[b, i].nonzero().flatten().tolist()
                t = sum(((A[b, k, :, j] - h[b, i]) ** 2).sum() for j in js) if js else torch.tensor(0.0)
                m_bar = A[b, k][:, js].mean(-1) if js else torch.zeros_like(h[b, i])
                assert torch.allclose(tok[b, k, i], torch.as_tensor(t, dtype=tok.dtype))
                assert torch.allclose(grp[b, k, i], ((m_bar - h[b, i]) ** 2).sum())


@pytest.mark.parametrize("mode", ["none", "max", "sum"])
def test_fused_bracket_equals_the_reference_in_value_and_gradient(mode):
    """`hola_fused.fused_eq3_bracket` (training's) against `hola.eq3_bracket` (the formula): the same terms and the
    same gradients, for several layers of different head counts wider than the token columns read; gradcheck."""
    layers, h, W, n, area, g = _bracket_inputs(4, heads=(3, 1), width=10)
    fused = fused_eq3_bracket(layers, h, W, n, mode, area)
    ref = eq3_bracket(layers, h, W, n, mode, area)
    w = [torch.rand(*fused[0].shape, generator=g, dtype=torch.float64) for _ in range(2)]
    loss = lambda t: (t[0] * w[0]).sum() + (t[1] * w[1]).sum()  # noqa: E731
    for f, r in zip(fused, ref):
        assert f.shape == r.shape == (2, 4, 3) and torch.allclose(f, r)
    gf, gr = torch.autograd.grad(loss(fused), layers), torch.autograd.grad(loss(ref), layers)
    for a, b, x in zip(gf, gr, layers):
        assert a.shape == x.shape and torch.allclose(a, b) and a[..., 7:].eq(0).all()   # past the columns read
        assert a[0, :, :, 4:].eq(0).all() and a[0, :, :, 0].eq(0).all()                 # tokens in no group
    assert torch.autograd.gradcheck(lambda a, b: fused_eq3_bracket([a, b], h, W, n, mode, area), tuple(layers))


OPTIONS = [dict(normalize=nm, heads=hd, weighting=wt, pixel_reduction=pr, empty_masks=em)
           for nm in ("none", "max", "sum") for hd in ("per_head", "mean") for wt in ("pooled", "eq3", "group")
           for pr, em in (("mean", "skip"), ("sum", "keep"))]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o.values()))
def test_hola_terms_fused_equals_reference_over_the_options(options):
    """Every combination of HOLA's options: the loss, its terms and the maps' gradients are the same whether Eq. 3's
    bracket is the reference formula or the fused kernel (two resolutions, two layers, a dropped sample, an empty
    mask, an absent group)."""
    g = torch.Generator().manual_seed(11)
    B, T, G = 3, 12, 3
    maps = {s: [torch.rand(B, H, s * s, T, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
                for H in (2, 1)] for s in (2, 4)}
    spans = torch.tensor([[[1, 3], [3, 6], [6, 7]], [[1, 2], [-1, -1], [2, 5]], [[1, 4], [4, 5], [5, 9]]])
    masks = {4: (torch.rand(B, G, 4, 4, generator=g) > 0.4).double()}
    masks[4][0, 2] = 0                                                     # an empty mask
    present = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    keep = torch.tensor([True, True, False])
    cfg = HolaConfig(resolutions="all", **options)
    out = []
    for bracket in (eq3_bracket, fused_eq3_bracket):
        t = hola_terms(maps, spans, masks, present, cfg, keep=keep, bracket=bracket)
        grads = torch.autograd.grad(t.loss + t.token_term + t.group_term, [x for s in maps for x in maps[s]])
        out.append((t, grads))
    (t1, g1), (t2, g2) = out
    assert (t1.n_groups, t1.n_samples) == (t2.n_groups, t2.n_samples)
    for a, b in ((t1.loss, t2.loss), (t1.token_term, t2.token_term), (t1.group_term, t2.group_term), *zip(g1, g2)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_row_max_finds_the_maximum_and_an_index_holding_it():
    """`_row_max` (the max-normalisation's peak, folded in halves) agrees with torch.max, ties included."""
    g = torch.Generator().manual_seed(7)
    for n in (256, 64, 49, 12, 1):
        x = torch.rand(3, 4, n, generator=g)
        x[0, 0] = 0.25                                   # a row of ties
        x[1, 2, n // 2:] = x[1, 2].max()                 # the max held at many places
        peak, i = _row_max(x)
        assert torch.equal(peak, x.max(-1).values)
        assert torch.equal(x.gather(-1, i[..., None])[..., 0], peak) and i.dtype == torch.long


def test_captured_maps_are_stored_token_major():
    """`capture_cross_attention` hands over M as (B, heads, P, 77) whose transpose is contiguous: each token's map is
    a row in memory, the layout the fused kernel reads without copying."""
    unet = build_unet("toy", 0)
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 77, unet.config.cross_attention_dim)
    with capture_cross_attention(unet, "training", resolutions=(8, 16)) as store:
        unet(x, 10, c)
        maps = store.maps()
    for ms in maps.values():
        for m in ms:
            assert m.shape[-1] == 77 and m.transpose(-1, -2).is_contiguous()
            assert torch.allclose(m.sum(-1), torch.ones(()))


def test_fused_loss_on_captured_maps_gives_the_reference_gradients_of_every_weight():
    """On a real UNet forward: HOLA through the fused kernel (training's path) gives the loss and every weight's
    gradient that the reference formula gives."""
    unet = build_unet("toy", 0)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    spans = torch.tensor([[[1, 4], [4, 9], [-1, -1]], [[2, 3], [3, 8], [8, 10]]])
    masks = {16: (torch.rand(2, 3, 16, 16, generator=g) > 0.5).float()}
    present = torch.ones(2, 3, dtype=torch.bool)
    cfg = HolaConfig(resolutions=(16,), normalize="max")
    out = []
    for bracket in (eq3_bracket, fused_eq3_bracket):
        unet.zero_grad()
        with capture_cross_attention(unet, "training", resolutions=(16,)) as store:
            loss = unet(x, 10, c).sample.square().mean()
            hola = hola_terms(store.maps(), spans, masks, present, cfg, bracket=bracket).loss
            (loss + hola).backward()
        out.append((hola.detach(), [p.grad.clone() for p in unet.parameters() if p.grad is not None]))
    (h0, g0), (h1, g1) = out
    torch.testing.assert_close(h1, h0, rtol=1e-6, atol=0)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_loss_saves_no_full_size_tensor_for_backward():
    """Memory: besides the maps themselves (already kept by the attention's softmax), fused HOLA keeps only small
    per-group tensors for backward — no (maps − masks) difference, no stacked copy of the layers."""
    g = torch.Generator().manual_seed(0)
    B, H, T, G = 2, 4, 77, 5
    maps = {16: [torch.rand(B, H, 256, T, generator=g).softmax(-1).requires_grad_() for _ in range(3)]}
    spans = torch.tensor([[[1, 4], [4, 9], [9, 12], [12, 20], [-1, -1]]] * B)
    masks = {16: (torch.rand(B, G, 16, 16, generator=g) > 0.5).float()}
    present = torch.ones(B, G, dtype=torch.bool)
    map_ptrs = {m.untyped_storage().data_ptr() for m in maps[16]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in map_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = hola_loss(maps, spans, masks, present, HolaConfig(resolutions="all"), bracket=fused_eq3_bracket)
    loss.backward()
    map_bytes = maps[16][0].numel() * 4            # one layer's maps; all that is kept is under an eighth per layer
    assert sum(saved.values()) < len(maps[16]) * map_bytes / 8, (sorted(saved.values()), map_bytes)
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in maps[16])


def test_hola_table_gives_the_hand_worked_terms():
    rows = hola_table(*hand_example(), HolaConfig(resolutions="all"), names=["top", "hair"], tokens=list("SABC"))
    assert [r["group"] for r in rows] == ["top", "hair"] and rows[0]["tokens"] == "A B"
    assert rows[0]["per-token ‖m_j−h_i‖²"] == "0.250 0.125"                  # 1/4, 1/8 (docstring of hand_example)
    assert rows[0]["second term ‖m̄_i−h_i‖²"] == pytest.approx(5 / 32, abs=1e-4)
    pooled = sum(r["first term Σ_j"] + r["second term ‖m̄_i−h_i‖²"] for r in rows) / (3 + 2)
    assert pooled == pytest.approx(hola_loss(*hand_example(), HolaConfig(resolutions="all")).item(), abs=1e-4)
    summed = hola_table(*hand_example(), HolaConfig(resolutions="all", pixel_reduction="sum"))
    assert summed[0]["first term Σ_j"] == pytest.approx(1.5)                # 1 + 1/2
    maps, spans, masks, _ = hand_example()
    assert not hola_table(maps, spans, masks, torch.tensor([[True, False]]))[1]["counts"]


def test_fit_maps_to_masks_moves_maps_onto_masks():
    _, spans, masks, present = hand_example()
    fit = fit_maps_to_masks(spans, masks, present, num_tokens=4, steps=60, lr=0.2)
    assert fit["losses"][-1] < 0.5 * fit["losses"][0]
    for key, low, high in (("initial", 0.0, 0.6), ("final", 0.9, 1.0)):
        m = fit[key][2][0, 0]                                               # (P=4, T=4)
        group_maps = torch.stack([m[:, 1:3].mean(-1), m[:, 3]]).reshape(2, 2, 2)
        share = mass_in_mask(group_maps, masks[2][0])                       # attention mass inside each mask
        assert ((share >= low) & (share <= high)).all(), (key, share)


def test_plot_hola_terms_draws_one_row_per_group():
    matplotlib.use("Agg")
    fig = plot_hola_terms(*hand_example(), HolaConfig(resolutions="all"), names=["top", "hair"])
    assert len(fig.axes) == 2 * 4                                           # mask, 2 token maps, the mean
    assert "0.156" in fig.axes[3].get_title()                               # ‖m̄_0 − h_0‖² = 5/32
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_hola_terms(hand_example()[0], torch.full((1, 2, 2), -1), *hand_example()[2:])
