"""Semantic mask sets H = {h_1, ..., h_N} from human-parsing maps (CosmicMan, Sec. 4.2).

HOLA (Eq. 3) pulls the cross-attention maps of a caption group's tokens towards that group's mask:
h_1 is the whole person (the union of all human parts, paired with C_body) and h_2..h_N are the
outfit-level masks (hair, tops, bottoms, shoes, ...), each tied one to one to an outfit caption group
c_i of the discretizer. The group order is the protocol's (`protocol.yaml`, groups with a mask).

A parsing map is a (H, W) array of label indices; three label sets are understood:
* "atr"  - the 18 ATR labels the protocol is built on (what SCHP's ATR model predicts),
* "lip"  - LIP's 20 labels (SCHP's LIP model),
* "dfmm" - DeepFashion-MultiModal's 24 parsing labels (Text2Human).
Each mask is resized to the UNet's cross-attention resolutions by *area* interpolation (the fraction
of each cell covered by the group), so values lie in [0, 1]; groups with no pixel are flagged absent,
so the loss can skip them.

But: LIP has no belt or bag label, so those masks are always absent for LIP maps. DeepFashion-MultiModal
has one "skin" label for arms, legs and neck alike: its legs mask holds only socks and its arms mask
only gloves and wrist wear (bare skin still counts in h_1). Rings, necklaces and earrings count in h_1 only.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from . import toyworld
from .captions import compose
from .discretize import discretize
from .protocol import Protocol, load_protocol

LIP_LABELS = ("Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat", "Socks",
              "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg", "Right-leg",
              "Left-shoe", "Right-shoe")
DFMM_LABELS = ("background", "top", "outer", "skirt", "dress", "pants", "leggings", "headwear", "eyeglass",
               "neckwear", "belt", "footwear", "bag", "hair", "face", "skin", "ring", "wrist wearing", "socks",
               "gloves", "necklace", "rompers", "earrings", "tie")

# outfit group -> labels, for the label sets other than ATR (ATR's come from the protocol itself)
_GROUP_LABELS = {
    "lip": {"hair": (2,), "face": (13,), "eyewear": (4,), "hat": (1,), "tops": (5, 7), "dress": (6, 10),
            "bottoms": (9, 12), "belt": (), "legs": (16, 17, 8), "shoes": (18, 19), "arms": (14, 15, 3),
            "bag": (), "scarf": (11,)},
    "dfmm": {"hair": (13,), "face": (14,), "eyewear": (8,), "hat": (7,), "tops": (1, 2), "dress": (4, 21),
             "bottoms": (3, 5, 6), "belt": (10,), "legs": (18,), "shoes": (11,), "arms": (19, 17), "bag": (12,),
             "scarf": (9, 23)},
}
LABEL_SETS = ("atr", "lip", "dfmm")


def label_names(label_set: str) -> tuple[str, ...]:
    """The class names of a label set, index = label value."""
    if label_set == "atr":
        return tuple(p.name for p in load_protocol().parts)
    if label_set == "lip":
        return LIP_LABELS
    if label_set == "dfmm":
        return DFMM_LABELS
    raise ValueError(f"unknown label set {label_set!r}; use one of {', '.join(LABEL_SETS)}")


def group_labels(label_set: str = "atr", protocol: Protocol | None = None) -> dict[str, tuple[int, ...]]:
    """Mask group name -> the label values whose union is its mask, in protocol order (body first)."""
    protocol = protocol or load_protocol()
    n = len(label_names(label_set))
    out = {}
    for g in protocol.groups:
        if not g.has_mask:
            continue
        if g.level == "body":  # h_1: every human part
            out[g.name] = tuple(range(1, n))
        elif label_set == "atr":
            out[g.name] = tuple(g.atr_labels)
        else:
            if g.name not in _GROUP_LABELS[label_set]:
                raise ValueError(f"the {label_set!r} label set has no mapping for mask group {g.name!r}; "
                                 f"add it to masks._GROUP_LABELS[{label_set!r}]")
            out[g.name] = _GROUP_LABELS[label_set][g.name]
    return out


@lru_cache(maxsize=8)
def _lut(label_set: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(group names, (n_labels, G) float32 table: label value -> one-hot over the groups it belongs to)."""
    groups = group_labels(label_set)
    n = len(label_names(label_set))
    lut = np.zeros((n, len(groups)), np.float32)
    for gi, labels in enumerate(groups.values()):
        lut[list(labels), gi] = 1.0
    lut.flags.writeable = False
    return tuple(groups), lut


@dataclass
class MaskSet:
    """H for one image: `names` (G group names, body first), `masks` {size: (G, size, size) float32 in
    [0, 1]}, `present` (G,) bool (False where the group has no pixel)."""
    names: tuple[str, ...]
    masks: dict[int, torch.Tensor]
    present: torch.Tensor

    def mask(self, name: str, size: int) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"no mask group {name!r}; groups are {', '.join(self.names)}")
        if size not in self.masks:
            raise KeyError(f"no masks at {size}x{size}; sizes here: {sorted(self.masks)}")
        return self.masks[size][self.names.index(name)]


def _unknown_labels(parsing: np.ndarray, label_set: str, n: int) -> ValueError:
    bad = sorted(int(v) for v in np.unique(parsing) if v < 0 or v >= n)
    return ValueError(f"parsing map holds label value(s) {bad} unknown to the {label_set!r} label set "
                      f"(valid: 0..{n - 1}); pass the label set the map was made with "
                      f"(one of {', '.join(LABEL_SETS)})")


@lru_cache(maxsize=32)
def _cell_keys(h: int, w: int, size: int, n: int) -> np.ndarray:
    """For each pixel (row-major), n * the index of its cell in a size x size grid (h, w divisible)."""
    ci = np.arange(h) // (h // size)
    cj = np.arange(w) // (w // size)
    keys = ((ci[:, None] * size + cj[None, :]) * n).astype(np.intp).ravel()
    keys.flags.writeable = False
    return keys


def mask_set(parsing, label_set: str = "atr", sizes=(8, 16, 32), protocol: Protocol | None = None) -> MaskSet:
    """Parsing map (H, W) of `label_set` label values -> MaskSet H at each size in `sizes` (Sec. 4.2).

    Area interpolation, computed by counting: when a size divides the map, one `bincount` over
    (cell, label) pairs gives each cell's label histogram, and the (labels x groups) table turns it into
    group fractions - exactly the block mean of the groups' one-hot maps, and fast (>= 2,000 maps/s for
    three sizes of a 64x64 map). Other sizes use torch's adaptive average pooling of the one-hot maps.
    """
    if label_set not in LABEL_SETS:
        raise ValueError(f"unknown label set {label_set!r}; use one of {', '.join(LABEL_SETS)}")
    if isinstance(parsing, torch.Tensor):
        parsing = parsing.detach().cpu().numpy()
    parsing = np.asarray(parsing)
    if parsing.ndim != 2:
        raise ValueError(f"parsing map must be 2-D (H, W) label indices, got shape {parsing.shape}")
    if not np.issubdtype(parsing.dtype, np.integer):
        raise ValueError(f"parsing map must hold integer labels, got dtype {parsing.dtype}; "
                         "read label PNGs with PIL in mode 'L' or 'P' (not RGB)")
    sizes = tuple(int(s) for s in sizes)
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"sizes = {sizes}: give one or more positive resolutions, e.g. (8, 16, 32)")
    names, lut = _lut(label_set) if protocol is None else _lut_for(label_set, protocol)
    n, g = lut.shape
    h, w = parsing.shape
    flat = parsing.ravel()
    try:
        hist = np.bincount(flat, minlength=n)
    except ValueError:  # negative values
        raise _unknown_labels(parsing, label_set, n) from None
    if len(hist) > n:
        raise _unknown_labels(parsing, label_set, n)
    present = (hist.astype(np.float32) @ lut) > 0
    masks: dict[int, torch.Tensor] = {}
    onehot = None
    for s in sizes:
        if s in masks:
            continue
        if h % s == 0 and w % s == 0:
            counts = np.bincount(_cell_keys(h, w, s, n) + flat, minlength=s * s * n).reshape(s * s, n)
            m = (counts.astype(np.float32) @ lut) * np.float32(1.0 / ((h // s) * (w // s)))
            m = np.ascontiguousarray(m.T).reshape(g, s, s)
        else:
            if onehot is None:
                onehot = torch.from_numpy(np.ascontiguousarray(lut[parsing].transpose(2, 0, 1)))
            m = F.adaptive_avg_pool2d(onehot, s).numpy()
        masks[s] = torch.from_numpy(m)
    return MaskSet(names, masks, torch.from_numpy(present))


def _lut_for(label_set: str, protocol: Protocol):
    groups = group_labels(label_set, protocol)
    lut = np.zeros((len(label_names(label_set)), len(groups)), np.float32)
    for gi, labels in enumerate(groups.values()):
        lut[list(labels), gi] = 1.0
    return tuple(groups), lut


def plot_mask_set(image: np.ndarray, ms: MaskSet, discretized=None, sizes=None, only_present: bool = True):
    """A figure of H: one row per group, the image with the group's mask over it, then the mask at each
    size, titled with the group's caption phrases and token span (s, e) when `discretized` is given -
    the pairing h_i <-> c_(s_i, e_i) that HOLA (Eq. 3) trains on.
    """
    import matplotlib.pyplot as plt  # noqa: PLC0415  (lazy: matplotlib only for the figure)

    sizes = sorted(ms.masks) if sizes is None else list(sizes)
    rows = [i for i, _ in enumerate(ms.names) if ms.present[i] or not only_present]
    spans = {g.name: g for g in discretized.groups} if discretized is not None else {}
    fig, axes = plt.subplots(len(rows), 1 + len(sizes), figsize=(1.6 * (1 + len(sizes)) + 3.2, 1.5 * len(rows)),
                             squeeze=False)
    for r, gi in enumerate(rows):
        name = ms.names[gi]
        big = ms.masks[max(ms.masks)][gi].numpy()
        up = np.kron(big, np.ones((image.shape[0] // big.shape[0], image.shape[1] // big.shape[1])))
        axes[r, 0].imshow(image)
        axes[r, 0].imshow(up, cmap="magma", alpha=0.55, vmin=0, vmax=1)
        g = spans.get(name)
        label = f"{name}\n" + (f"span {g.span}: " + ", ".join(g.phrases) if g else "(not in caption)")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        axes[r, -1].text(1.08, 0.5, label[len(name) + 1:], transform=axes[r, -1].transAxes, va="center",
                         fontsize=8, wrap=True)
        for c, s in enumerate(sizes, start=1):
            axes[r, c].imshow(ms.masks[s][gi].numpy(), cmap="gray", vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(f"{s}x{s}", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.subplots_adjust(left=0.12, right=0.62, top=0.95, bottom=0.02, wspace=0.05, hspace=0.1)
    return fig


def mask_set_viewer(seed: int = 0, size: int = 64, sizes=(8, 16, 32), max_seed: int = 9999):
    """An ipywidgets box to flip through toy people and their mask sets (notebook 03).

    A seed slider; a question and an answer to force (the same seed drawn again with only that answer allowed,
    through `toyworld.Sampling`, so the rest of the person stays as it was unless the answer changes what else
    is drawn, e.g. a dress instead of a top); the caption with its groups coloured; and `plot_mask_set`: each
    group's mask over the image and at each of `sizes`, beside its phrases and token span. Children:
    ``[HBox([seed, question, answer]), caption (HTML), picture (PNG Image)]``.
    """
    # lazy: the widget stack (ipywidgets, the editor's HTML, matplotlib through viz) takes about a second to
    # import, which every user of mask sets (datasets, training, the CLI) would otherwise pay
    import ipywidgets as W  # noqa: PLC0415

    from .viz import png_bytes  # noqa: PLC0415
    from .widgets import caption_html  # noqa: PLC0415

    keep = "(as drawn)"
    seed_w = W.IntSlider(value=seed, min=0, max=max_seed, description="seed", continuous_update=False)
    question = W.Dropdown(options=[keep, *toyworld.WORLD_ANSWERS], value=keep, description="force")
    answer = W.Dropdown(options=[keep], value=keep, description="answer")
    caption, picture = W.HTML(), W.Image(format="png")

    def draw(_=None):
        q, a = question.value, answer.value
        sampling = None
        if q != keep and a != keep:
            sampling = toyworld.Sampling(weights={q: {o: float(o == a) for o in toyworld.WORLD_ANSWERS[q]}})
        person = toyworld.render(seed_w.value, size=size, sampling=sampling)
        d = discretize(compose(person.annotation))
        forced = f" · {q} forced to <b>{a}</b> (answered: {person.annotation.answers[q]})" if sampling else ""
        caption.value = f"seed {seed_w.value}{forced}" + caption_html(d)
        picture.value = png_bytes(plot_mask_set(person.image, mask_set(person.parsing, "atr", sizes), d, sizes))

    def on_question(_):
        answer.unobserve(draw, names="value")
        answer.options = [keep] if question.value == keep else [keep, *toyworld.WORLD_ANSWERS[question.value]]
        answer.value = keep
        answer.observe(draw, names="value")
        draw()

    seed_w.observe(draw, names="value")
    question.observe(on_question, names="value")
    answer.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox([seed_w, question, answer]), caption, picture])
