"""HOLA (Eq. 3): a hand-worked example, a gradient check, edge cases and each option's effect."""
import math

import pytest
import torch

from cosmiclite.hola import HolaConfig, daring_loss, hola_loss, hola_terms, normalize_maps, token_membership


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


def test_eq3_bracket_matches_the_direct_formula_and_gradcheck():
    """The fused bracket (Σ_j ‖m_j − h_i‖², ‖m̄_i − h_i‖²) equals the formula written out with autograd."""
    from cosmiclite.hola import eq3_bracket
    g = torch.Generator().manual_seed(3)
    B, H, P, T, G = 2, 3, 9, 7, 3
    A = torch.rand(B, H, P, T, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    h = (torch.rand(B, G, P, generator=g) > 0.5).double()
    W = token_membership(torch.tensor([[[1, 3], [3, 4], [-1, -1]], [[0, 2], [2, 5], [5, 7]]]), T).double()
    n = W.sum(-1)
    tok, grp = eq3_bracket(A, h, W, n)
    # direct: per token, its group's mask; per group, the mean of its tokens' maps
    ht = torch.einsum("bgt,bgp->bpt", W, h)[:, None]
    direct_tok = torch.einsum("bhpt,bgt->bhg", (A - ht) ** 2, W)
    m_bar = torch.einsum("bhpt,bgt->bhgp", A, W / n.clamp_min(1)[..., None])
    direct_grp = ((m_bar - h[:, None]) ** 2).sum(-1)
    assert torch.allclose(tok, direct_tok) and torch.allclose(grp, direct_grp)
    w1, w2 = torch.rand(B, H, G, generator=g, dtype=torch.float64), torch.rand(B, H, G, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((tok * w1).sum() + (grp * w2).sum(), A)[0]
    gd = torch.autograd.grad((direct_tok * w1).sum() + (direct_grp * w2).sum(), A)[0]
    assert torch.allclose(ga, gd)
    assert ga[0, :, :, 4:].abs().max() == 0          # tokens in no group (and the absent group's) get no gradient
    assert torch.autograd.gradcheck(lambda a: eq3_bracket(a, h, W, n), (A,))


@pytest.mark.parametrize("mode", ["max", "sum"])
def test_eq3_bracket_folds_in_the_normalisation(mode):
    """Rescaling inside the bracket gives the values and gradients of rescaling first (`normalize_maps`, plain
    autograd) and then taking the bracket; and it passes gradcheck, the rescaling's own gradient included."""
    from cosmiclite.hola import eq3_bracket
    g = torch.Generator().manual_seed(4)
    B, H, P, T, G = 2, 3, 9, 7, 3
    A = torch.rand(B, H, P, T, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    h = (torch.rand(B, G, P, generator=g) > 0.5).double()
    W = token_membership(torch.tensor([[[1, 3], [3, 4], [-1, -1]], [[0, 2], [2, 5], [5, 7]]]), T).double()
    n, area = W.sum(-1), h.sum(-1)
    fused = eq3_bracket(A, h, W, n, mode, area)
    ref = eq3_bracket(normalize_maps(A, mode, W, area), h, W, n)
    w = [torch.rand(B, H, G, generator=g, dtype=torch.float64) for _ in range(2)]
    loss = lambda t: (t[0] * w[0]).sum() + (t[1] * w[1]).sum()  # noqa: E731
    for f, r in zip(fused, ref):
        assert torch.allclose(f, r)
    assert torch.allclose(torch.autograd.grad(loss(fused), A)[0], torch.autograd.grad(loss(ref), A)[0])
    assert torch.autograd.gradcheck(lambda a: eq3_bracket(a, h, W, n, mode, area), (A,))


@pytest.mark.parametrize("mode", ["none", "max"])
def test_eq3_bracket_reads_several_layers_side_by_side_and_only_the_first_columns(mode):
    """Layers given together (of different head counts, wider than the token columns the groups use) give each
    layer's terms and gradients as if given one by one, sliced: the columns past S's width get exactly zero."""
    from cosmiclite.hola import eq3_bracket
    g = torch.Generator().manual_seed(5)
    B, P, Tc, T, G = 2, 9, 6, 10, 2
    layers = [torch.rand(B, H, P, T, generator=g, dtype=torch.float64).softmax(-1).requires_grad_() for H in (3, 1)]
    h = (torch.rand(B, G, P, generator=g) > 0.5).double()
    W = token_membership(torch.tensor([[[1, 3], [3, 6]], [[0, 2], [-1, -1]]]), Tc).double()
    n, area = W.sum(-1), h.sum(-1)
    tok, grp = eq3_bracket(layers, h, W, n, mode, area)
    assert tok.shape == grp.shape == (B, 4, G)
    w = torch.rand(B, 4, G, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((tok * w).sum() + grp.sum(), layers)
    at = 0
    for x, gx in zip(layers, grads):
        H = x.shape[1]
        t1, g1 = eq3_bracket(x[..., :Tc], h, W, n, mode, area)
        assert torch.allclose(tok[:, at:at + H], t1) and torch.allclose(grp[:, at:at + H], g1)
        ref = torch.autograd.grad((t1 * w[:, at:at + H]).sum() + g1.sum(), x)[0]
        assert gx.shape == x.shape and torch.allclose(gx, ref) and gx[..., Tc:].eq(0).all()
        at += H
    assert torch.autograd.gradcheck(lambda a, b: eq3_bracket([a, b], h, W, n, mode, area), tuple(layers))


@pytest.mark.parametrize("mode", ["none", "max", "sum"])
def test_eq3_bracket_gives_the_same_terms_and_gradients_for_token_major_maps(mode):
    """The capture stores M token-major (M^T contiguous, handed over as a (P, T) view); the bracket reads it as rows
    and gives exactly what it gives for the same maps stored (P, T)-contiguous; its gradient comes back token-major."""
    from cosmiclite.hola import eq3_bracket
    g = torch.Generator().manual_seed(6)
    B, P, T, G = 2, 16, 9, 2
    rows = [torch.rand(B, H, T, P, generator=g, dtype=torch.float64).softmax(-2) for H in (2, 3)]   # (B, H, T, P)
    token_major = [x.clone().transpose(2, 3).requires_grad_() for x in rows]                       # (P, T) views
    plain = [x.transpose(2, 3).contiguous().requires_grad_() for x in rows]
    h = (torch.rand(B, G, P, generator=g) > 0.5).double()
    W = token_membership(torch.tensor([[[1, 3], [3, 6]], [[0, 2], [4, 5]]]), 7).double()
    n, area = W.sum(-1), h.sum(-1)
    out = []
    for layers in (token_major, plain):
        tok, grp = eq3_bracket(layers, h, W, n, mode, area)
        out.append((tok, grp, torch.autograd.grad(tok.sum() + 2 * grp.sum(), layers)))
    (t1, g1, d1), (t2, g2, d2) = out
    assert torch.equal(t1, t2) and torch.equal(g1, g2)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(d1, d2))
    assert all(a.transpose(2, 3).is_contiguous() for a in d1 + d2)
    assert torch.autograd.gradcheck(lambda a, b: eq3_bracket([a, b], h, W, n, mode, area), tuple(token_major))


def test_row_max_finds_the_maximum_and_an_index_holding_it():
    """`_row_max` (the max-normalisation's peak, folded in halves) agrees with torch.max, ties included."""
    from cosmiclite.hola import _row_max
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
    a row in memory, the layout Eq3Bracket reads without copying."""
    from cosmiclite.attention import capture_cross_attention
    from cosmiclite.models import build_unet
    unet = build_unet("toy", 0)
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 77, unet.config.cross_attention_dim)
    with capture_cross_attention(unet, "training", resolutions=(8, 16)) as store:
        unet(x, 10, c)
        maps = store.maps()
    for ms in maps.values():
        for m in ms:
            assert m.shape[-1] == 77 and m.transpose(-1, -2).is_contiguous()
            assert torch.allclose(m.sum(-1), torch.ones(()))


def test_token_major_maps_give_the_same_loss_and_gradients():
    """Training reads `store.token_major_maps()` (M^T as the attention computed it, so HOLA's gradient reaches the
    softmax with no transpose node between and autograd adds the M V gradient into it in place): the loss and every
    weight's gradient are those of the documented (B, heads, P, 77) path."""
    from cosmiclite.attention import capture_cross_attention
    from cosmiclite.models import build_unet
    unet = build_unet("toy", 0)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    spans = torch.tensor([[[1, 4], [4, 9], [-1, -1]], [[2, 3], [3, 8], [8, 10]]])
    masks = {16: (torch.rand(2, 3, 16, 16, generator=g) > 0.5).float()}
    present = torch.ones(2, 3, dtype=torch.bool)
    cfg = HolaConfig(resolutions=(16,), normalize="max")
    out = []
    for token_major in (False, True):
        unet.zero_grad()
        with capture_cross_attention(unet, "training", resolutions=(16,)) as store:
            loss = unet(x, 10, c).sample.square().mean()
            if token_major:
                tm, views = store.token_major_maps(), store.maps()
                assert all(v.shape == t.transpose(-1, -2).shape and v.data_ptr() == t.data_ptr()
                           for r in tm for t, v in zip(tm[r], views[r]))
                maps = tm
            else:
                maps = store.maps()
            hola = hola_terms(maps, spans, masks, present, cfg, token_major=token_major).loss
            (loss + hola).backward()
        out.append((hola.detach(), [p.grad.clone() for p in unet.parameters() if p.grad is not None]))
    (h0, g0), (h1, g1) = out
    torch.testing.assert_close(h1, h0, rtol=1e-6, atol=0)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_loss_saves_no_full_size_tensor_for_backward():
    """Memory: besides the maps themselves (already kept by the attention's softmax), HOLA keeps only small
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
        loss = hola_loss(maps, spans, masks, present, HolaConfig(resolutions="all"))
    loss.backward()
    map_bytes = maps[16][0].numel() * 4            # one layer's maps; all that is kept is under an eighth per layer
    assert sum(saved.values()) < len(maps[16]) * map_bytes / 8, (sorted(saved.values()), map_bytes)
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in maps[16])


def test_hola_table_gives_the_hand_worked_terms():
    from cosmiclite.hola import hola_table
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
    from cosmiclite.attention import mass_in_mask
    from cosmiclite.hola import fit_maps_to_masks
    _, spans, masks, present = hand_example()
    fit = fit_maps_to_masks(spans, masks, present, num_tokens=4, steps=60, lr=0.2)
    assert fit["losses"][-1] < 0.5 * fit["losses"][0]
    for key, low, high in (("initial", 0.0, 0.6), ("final", 0.9, 1.0)):
        m = fit[key][2][0, 0]                                               # (P=4, T=4)
        group_maps = torch.stack([m[:, 1:3].mean(-1), m[:, 3]]).reshape(2, 2, 2)
        share = mass_in_mask(group_maps, masks[2][0])                       # attention mass inside each mask
        assert ((share >= low) & (share <= high)).all(), (key, share)


def test_plot_hola_terms_draws_one_row_per_group():
    import matplotlib
    matplotlib.use("Agg")
    from cosmiclite.hola import plot_hola_terms
    fig = plot_hola_terms(*hand_example(), HolaConfig(resolutions="all"), names=["top", "hair"])
    assert len(fig.axes) == 2 * 4                                           # mask, 2 token maps, the mean
    assert "0.156" in fig.axes[3].get_title()                               # ‖m̄_0 − h_0‖² = 5/32
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_hola_terms(hand_example()[0], torch.full((1, 2, 2), -1), *hand_example()[2:])


def test_t_range_selects_timesteps_and_round_trips():
    cfg = HolaConfig(t_range=[0, 500])
    assert cfg.in_t_range(torch.tensor([0, 499, 500, 999])).tolist() == [True, True, False, False]
    assert HolaConfig().in_t_range(torch.tensor([0, 999])).all()
    assert HolaConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["t_range"] == [0, 500]
    for bad in ([500, 500], [-1, 10], [0.5, 10], [1, 2, 3]):
        with pytest.raises(ValueError, match="t_range"):
            HolaConfig(t_range=bad)


def test_token_weight_zero_keeps_the_group_mean_term_only_hand_worked():
    """token_weight scales Eq. 3's first term. Hand example (see hand_example), pixel mean: with token_weight 0,
    "eq3" = 1/2 (5/32 + 1/8) = 9/64 and "pooled" = (5/32 + 1/8) / 2 = 9/64; with 0.5, pooled = (0.5 (1/4 + 1/8 + 1/8)
    + 5/32 + 1/8) / (0.5 * 3 + 2) = (17/32) / 3.5. The gradient then no longer tells a group's tokens apart."""
    maps, spans, masks, present = hand_example()
    for weighting in ("eq3", "pooled"):
        cfg = HolaConfig(resolutions="all", weighting=weighting, token_weight=0.0)
        assert math.isclose(hola_loss(maps, spans, masks, present, cfg).item(), 9 / 64, rel_tol=1e-6)
    half = HolaConfig(resolutions="all", token_weight=0.5)
    assert math.isclose(hola_loss(maps, spans, masks, present, half).item(), 17 / 32 / 3.5, rel_tol=1e-6)
    assert hola_loss(maps, spans, masks, present, HolaConfig(resolutions="all", token_weight=1.0)).item() == \
        hola_loss(maps, spans, masks, present, HolaConfig(resolutions="all")).item()
    m = maps[2].clone().requires_grad_()
    hola_loss({2: m}, spans, masks, present, HolaConfig(resolutions="all", token_weight=0.0)).backward()
    g = m.grad[0, 0]                                                  # (P, T): tokens 1 and 2 form group 0
    torch.testing.assert_close(g[:, 1], g[:, 2])
    assert g[:, 1].abs().sum() > 0 and g[:, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="token_weight"):
        HolaConfig(token_weight=-1.0)


def test_mask_peak_one_rescales_each_target_to_peak_at_one():
    """mask_peak="one": h_i / max_p h_i. Hand example with group 1's mask at 0.5 instead of 1: as_is the pooled
    loss is (1/4 + 1/8 + 5/32 + ‖m3 − h1‖² + ‖m̄1 − h1‖²) / 5 with h1 = [0 0 .5 0], i.e. 2 · (0 + 0 + 0 + .25)/4;
    with "one" h1 is the original [0 0 1 0] again and the loss the hand example's 5/32."""
    maps, spans, masks, present = hand_example()
    half = {2: masks[2] * torch.tensor([1.0, 0.5])[None, :, None, None]}
    as_is = hola_loss(maps, spans, half, present, HolaConfig(resolutions="all")).item()
    assert math.isclose(as_is, (1 / 4 + 1 / 8 + 5 / 32 + 2 * (0.25 / 4)) / 5, rel_tol=1e-6)
    one = HolaConfig(resolutions="all", mask_peak="one")
    assert math.isclose(hola_loss(maps, spans, half, present, one).item(), 5 / 32, rel_tol=1e-6)
    empty = {2: masks[2] * torch.tensor([1.0, 0.0])[None, :, None, None]}   # an empty mask stays empty (skipped)
    assert math.isclose(hola_loss(maps, spans, empty, present, one).item(),
                        hola_loss(maps, spans, empty, present, HolaConfig(resolutions="all")).item(), rel_tol=1e-6)


def test_mask_dilate_grows_each_target_by_whole_cells():
    """mask_dilate=k: h_i becomes its max over the (2k+1)^2 neighbourhood of each cell (the map's border clips it),
    before mask_peak; hand example: group 1's one-cell mask [0 0 1 0] on the 2x2 grid grows to all four cells, so
    ‖m3 − h1‖² (pixel mean) = (1 + 1 + .25 + .25)/4 and the pooled loss follows."""
    from cosmiclite.hola import _targets
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 0, 0], m[0, 0, 3, 2] = 1.0, 0.5
    grown = _targets({4: m}, 4, HolaConfig(mask_dilate=1))[0, 0]
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, .5, .5, .5], [0, .5, .5, .5]])
    torch.testing.assert_close(grown, expected)
    peaked = _targets({4: m}, 4, HolaConfig(mask_dilate=1, mask_peak="one"))[0, 0]
    torch.testing.assert_close(peaked, expected)             # this mask already peaks at 1
    maps, spans, masks, present = hand_example()
    loss = hola_loss(maps, spans, masks, present, HolaConfig(resolutions="all", mask_dilate=1)).item()
    # group 0's mask [1 1 0 0] grows to all four cells too: ‖m1 − 1‖² = (0 + 1 + 1 + 1)/4,
    # ‖m2 − 1‖² = (.25 + .25 + 1 + 1)/4, m̄0 = [.75 .25 0 0]: (1/16 + 9/16 + 1 + 1)/4;
    # group 1: ‖m3 − 1‖² = m̄1's = (1 + 1 + .25 + .25)/4
    terms = [3 / 4, 2.5 / 4, (10 / 16 + 2) / 4, 2.5 / 4, 2.5 / 4]
    assert math.isclose(loss, sum(terms) / 5, rel_tol=1e-6)
    with pytest.raises(ValueError, match="mask_dilate"):
        HolaConfig(mask_dilate=-1)


def test_skip_groups_leaves_a_named_group_out_as_if_it_were_absent():
    from cosmiclite.data import ToyWorldDataset, collate
    from cosmiclite.masks import group_labels
    b = collate([ToyWorldDataset(3, size=64, seed=7, mask_sizes=(8,))[i] for i in range(3)])
    g = torch.Generator().manual_seed(0)
    maps = {8: torch.randn(3, 2, 64, 77, generator=g).softmax(-1)}
    names = list(group_labels())
    assert names[0] == "body" and b["spans"].shape[1] == len(names)
    cfg = HolaConfig(resolutions=(8,), normalize="max")
    skipped = HolaConfig.from_dict({**cfg.to_dict(), "skip_groups": ["body"]})
    absent = b["present"].clone()
    absent[:, 0] = False
    got = hola_terms(maps, b["spans"], b["masks"], b["present"], skipped)
    want = hola_terms(maps, b["spans"], b["masks"], absent, cfg)
    assert got.loss.item() == want.loss.item() and got.n_groups == want.n_groups
    assert got.loss.item() != hola_terms(maps, b["spans"], b["masks"], b["present"], cfg).loss.item()
    assert skipped.to_dict()["skip_groups"] == ["body"]
    with pytest.raises(ValueError, match="skip_groups"):
        hola_loss(maps, b["spans"], b["masks"], b["present"], HolaConfig(resolutions=(8,), skip_groups=("torso",)))
