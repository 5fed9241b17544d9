"""Mask sets H (Sec. 4.2) on small hand-drawn parsing maps for the ATR, LIP and DeepFashion-MultiModal sets."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cosmiclite.masks import DFMM_LABELS, LIP_LABELS, group_labels, label_names, mask_set
from cosmiclite.protocol import load_protocol

GROUPS = ("body", "hair", "face", "eyewear", "hat", "tops", "dress", "bottoms", "belt", "legs", "shoes", "arms",
          "bag", "scarf")


def drawn(label_values: dict[str, int]) -> np.ndarray:
    """An 8x8 'person': hair rows 0-1, face rows 2-3 (cols 2-5), top rows 4-5, bottoms row 6, shoes row 7."""
    m = np.zeros((8, 8), np.uint8)
    m[0:2, 2:6] = label_values["hair"]
    m[2:4, 2:6] = label_values["face"]
    m[4:6, 1:7] = label_values["top"]
    m[6, 2:6] = label_values["bottoms"]
    m[7, 2:4] = label_values["left_shoe"]
    m[7, 4:6] = label_values["right_shoe"]
    return m


@pytest.mark.parametrize("label_set, values", [
    ("atr", {"hair": 2, "face": 11, "top": 4, "bottoms": 6, "left_shoe": 9, "right_shoe": 10}),
    ("lip", {"hair": 2, "face": 13, "top": 5, "bottoms": 9, "left_shoe": 18, "right_shoe": 19}),
    ("dfmm", {"hair": 13, "face": 14, "top": 1, "bottoms": 5, "left_shoe": 11, "right_shoe": 11}),
])
def test_hand_drawn_map_gives_the_right_masks(label_set, values):
    m = drawn(values)
    ms = mask_set(m, label_set, sizes=(8, 4, 2))
    assert ms.names == GROUPS == tuple(g.name for g in load_protocol().groups if g.has_mask)
    present = dict(zip(ms.names, ms.present.tolist()))
    assert {k for k, v in present.items() if v} == {"body", "hair", "face", "tops", "bottoms", "shoes"}
    full = ms.masks[8]
    assert torch.equal(full[ms.names.index("body")], torch.from_numpy((m > 0).astype(np.float32)))
    assert torch.equal(full[ms.names.index("hair")], torch.from_numpy((m == values["hair"]).astype(np.float32)))
    assert full[ms.names.index("shoes")].sum() == 4
    assert full[ms.names.index("tops")].sum() == 12
    # area interpolation: the top covers 2 of the 4 pixels of cells (2, 0) and (2, 3), all of (2, 1), (2, 2)
    tops4 = ms.mask("tops", 4)
    assert tops4[2].tolist() == [0.5, 1.0, 1.0, 0.5]
    assert ms.mask("hair", 2).tolist() == [[0.25, 0.25], [0.0, 0.0]]
    for s, t in ms.masks.items():
        assert t.dtype == torch.float32 and t.shape == (14, s, s)
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        assert not t[~ms.present].any()  # absent groups are all zero


def test_sizes_that_do_not_divide_use_area_pooling_and_stay_in_range():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 18, (50, 50)).astype(np.uint8)
    ms = mask_set(m, "atr", sizes=(7, 16, 32))
    onehot = torch.from_numpy(np.stack([np.isin(m, labels) for labels in group_labels("atr").values()]).astype(np.float32))
    for s in (7, 16, 32):
        assert torch.allclose(ms.masks[s], F.adaptive_avg_pool2d(onehot, s), atol=1e-6)
        assert 0.0 <= float(ms.masks[s].min()) and float(ms.masks[s].max()) <= 1.0
    assert list(ms.masks) == [7, 16, 32]


def test_label_sets_and_their_group_tables():
    assert len(label_names("atr")) == 18 and label_names("lip") == LIP_LABELS and len(LIP_LABELS) == 20
    assert len(DFMM_LABELS) == 24 and DFMM_LABELS[11] == "footwear"
    assert group_labels("lip")["tops"] == (5, 7) and group_labels("lip")["bag"] == ()
    assert group_labels("dfmm")["bottoms"] == (3, 5, 6)
    assert group_labels("atr")["body"] == tuple(range(1, 18))
    lip_only_coat = np.zeros((4, 4), np.uint8)
    lip_only_coat[1:3, 1:3] = 7  # LIP Coat
    ms = mask_set(lip_only_coat, "lip", sizes=(4,))
    assert ms.present.tolist() == [n in ("body", "tops") for n in GROUPS]


@pytest.mark.parametrize("label_set, bad", [("atr", 18), ("lip", 20), ("dfmm", 24), ("atr", 255)])
def test_unknown_label_value_names_value_and_label_set(label_set, bad):
    m = np.zeros((4, 4), np.uint8)
    m[0, 0] = bad
    with pytest.raises(ValueError, match=rf"\[{bad}\] unknown to the '{label_set}' label set"):
        mask_set(m, label_set)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown label set 'pascal'"):
        mask_set(np.zeros((4, 4), np.uint8), "pascal")
    with pytest.raises(ValueError, match="2-D"):
        mask_set(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="integer labels"):
        mask_set(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        mask_set(np.full((4, 4), -1, np.int64))
    ms = mask_set(torch.zeros(8, 8, dtype=torch.uint8), sizes=(4,))
    assert not ms.present.any()
    with pytest.raises(KeyError, match="no mask group 'shirt'"):
        ms.mask("shirt", 4)


def test_plot_mask_set_draws_one_row_per_present_group_with_its_span():
    import matplotlib
    matplotlib.use("Agg")
    from cosmiclite import toyworld
    from cosmiclite.captions import compose
    from cosmiclite.discretize import discretize
    from cosmiclite.masks import plot_mask_set

    p = toyworld.render(6)
    ms = mask_set(p.parsing)
    d = discretize(compose(p.annotation))
    fig = plot_mask_set(p.image, ms, d)
    n_rows = int(ms.present.sum())
    assert len(fig.axes) == n_rows * (1 + len(ms.masks))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    for g in d.groups:
        if g.name in ms.names and ms.present[ms.names.index(g.name)]:
            assert any(f"span {g.span}" in t for t in texts), g.name


def test_mask_set_viewer_flips_seeds_and_forces_one_answer():
    import matplotlib
    matplotlib.use("Agg")
    from cosmiclite import toyworld
    from cosmiclite.masks import mask_set_viewer

    box = mask_set_viewer(seed=6, sizes=(8, 16))
    (seed, question, answer), caption, picture = box.children[0].children, box.children[1], box.children[2]
    assert bytes(picture.value[:4]) == b"\x89PNG" and caption.value.startswith("seed 6<")
    assert "cosmiclite-phrase" in caption.value          # the caption with its groups coloured
    first = bytes(picture.value)
    seed.value = 8                                       # a nearly full-body person in a grey top
    assert caption.value.startswith("seed 8<") and bytes(picture.value) != first
    question.value = "top_color"
    assert list(answer.options[1:]) == list(toyworld.WORLD_ANSWERS["top_color"])
    plain = toyworld.render(8).annotation.answers
    assert plain["top_color"] == "grey"
    answer.value = "red"
    assert "top_color forced to <b>red</b> (answered: red)" in caption.value
    forced = toyworld.render(8, sampling=toyworld.Sampling(
        weights={"top_color": {c: float(c == "red") for c in toyworld.WORLD_ANSWERS["top_color"]}})).annotation.answers
    assert {q: a for q, a in forced.items() if q != "top_color"} == {q: a for q, a in plain.items() if q != "top_color"}
    question.value = "(as drawn)"
    assert answer.options == ("(as drawn)",) and "forced" not in caption.value
