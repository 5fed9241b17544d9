"""Drawing decomposed cross-attention (Sec. 4.3): group and token maps over the generated image.

A captured map m is tiny (8x8 ... 64x64 cells) and its values are softmax shares (summing to 1 over the 77
tokens at each cell, so a token's map rarely gets near 1). To read it we upsample it bilinearly to the image
size, min-max normalise each map on its own (so the pattern shows, not the absolute share: the colour bar
is per panel), colour-map it, and alpha-blend it over the image, the way Prompt-to-Prompt and
attend-and-excite draw theirs.

    overlay(image, map)                  -> RGB uint8 array: one heat map over the image
    plot_group_maps(result)              -> Figure: the image, then one panel per caption group
    plot_token_maps(result)              -> Figure: a grid, one panel per token, token strings as titles
    plot_maps_on_parts(image, maps, ms, res) -> Figure: each group's map with its own part outlined
    plot_part_matrix(alignment)          -> Figure: the group x part matrix (`cosmiclite.alignment`)
    save_figure(fig, path)               -> PNG on disk (png_bytes(fig): the PNG as bytes)
    attention_viewer(result)             -> ipywidgets box: sliders over step and resolution, group dropdown

`result` is a `cosmiclite.attention.AttentionResult`. Heavy imports (matplotlib, torch, ipywidgets) happen
inside the functions, so importing this module is cheap; scripts get matplotlib's Agg backend.

But: normalising per map hides how weak a map is overall; `normalize=False` keeps the raw shares
(0..max over the panel set) when that is the question.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


def upsample(heat, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h, w) map to size (H, W) (align_corners=False, as the masks are resized)."""
    import torch
    import torch.nn.functional as F
    t = torch.as_tensor(_np(heat))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def normalize_map(heat: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Min-max to [0, 1] (per map), or divide by a shared vmax when given."""
    heat = np.asarray(heat, dtype=np.float32)
    if vmax is not None:
        return np.clip(heat / max(vmax, 1e-12), 0, 1)
    lo, hi = float(heat.min()), float(heat.max())
    return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)


def overlay(image: np.ndarray | None, heat, alpha: float = 0.55, cmap: str = "jet", size: int | None = None,
            vmax: float | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 picture: `heat` upsampled to the image, normalised, colour-mapped, blended at `alpha`.

    image None draws the heat map alone (size x size, default 256).
    """
    from matplotlib import colormaps
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape}")
        H, W = image.shape[:2]
    else:
        H = W = size or 256
    h = normalize_map(upsample(heat, (H, W)), vmax)
    colour = colormaps[cmap](h)[..., :3]
    if image is None:
        return (colour * 255).round().astype(np.uint8)
    base = image.astype(np.float32) / 255.0
    blend = ((1 - alpha) * base + alpha * colour).clip(0, 1)
    return (blend * 255).round().astype(np.uint8)


def _figure(n_panels: int, cols: int, panel: float = 1.9):
    import matplotlib
    if "ipykernel" not in __import__("sys").modules:
        matplotlib.use("Agg")  # scripts and tests: no display
    import matplotlib.pyplot as plt
    cols = max(1, min(cols, n_panels))
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, panel * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


def _pick(maps: dict, res: int | None, step: int | None):
    if not maps:
        raise ValueError("this result holds no such maps (group maps need spans; token maps need keep_tokens)")
    res = res if res is not None else max(maps)
    if res not in maps:
        raise ValueError(f"res={res} was not captured; this result has {sorted(maps)}")
    x = maps[res]  # (T, C, h, w)
    if step is None:
        return res, x.mean(0)
    if not -x.shape[0] <= step < x.shape[0]:
        raise ValueError(f"step={step} is out of range: {x.shape[0]} step(s) stored (per_step=True keeps each)")
    return res, x[step]


def plot_group_maps(result, res: int | None = None, step: int | None = None, alpha: float = 0.55,
                    normalize: bool = True, cols: int = 6, title: str | None = None):
    """The image, then each caption group's map m_(s_i,e_i) over it (Sec. 4.3). step None = mean over steps."""
    res, maps = _pick(result.group_maps, res, step)
    vmax = None if normalize else float(maps.max())
    fig, axes = _figure(len(result.groups) + 1, cols)
    if result.image is not None:
        axes[0].imshow(result.image)
    axes[0].set_title("image", fontsize=8)
    for ax, (name, span), m in zip(axes[1:], result.groups, maps):
        ax.imshow(overlay(result.image, m, alpha, vmax=vmax))
        ax.set_title(f"{name} [{span[0]},{span[1]})", fontsize=8)
    when = "mean over steps" if step is None else f"step {step}"
    fig.suptitle(title or f"group maps, {res}x{res}, {when}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_token_maps(result, res: int | None = None, step: int | None = None, tokens: Sequence[int] | None = None,
                    alpha: float = 0.55, normalize: bool = True, cols: int = 8, title: str | None = None):
    """A grid of per-token maps m_j with the token strings as titles (default: every token of the prompt)."""
    res, maps = _pick(result.token_maps, res, step)
    idx = list(tokens) if tokens is not None else list(range(len(result.tokens)))
    vmax = None if normalize else float(maps[idx].max())
    fig, axes = _figure(len(idx), cols)
    for ax, j in zip(axes, idx):
        ax.imshow(overlay(result.image, maps[j], alpha, vmax=vmax))
        label = result.tokens[j] if j < len(result.tokens) else f"#{j}"
        ax.set_title(f"{j}: {label.replace('<|startoftext|>', '<start>').replace('<|endoftext|>', '<end>')}",
                     fontsize=8)
    when = "mean over steps" if step is None else f"step {step}"
    fig.suptitle(title or f"token maps, {res}x{res}, {when}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_part_matrix(alignment, res: int | None = None, ax=None, title: str | None = None):
    """The group x part matrix (an `alignment.Alignment`, or its `.matrix()` tuple): each caption group's map
    density in every part's mask, relative to its density over the whole person. A silhouette is all ones
    (white); decomposed attention is a red diagonal (outlined). Log colour scale, 1/4 (blue) to 4 (red)."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle
    groups, parts, D = alignment if isinstance(alignment, tuple) else alignment.matrix(res)
    if not groups:
        raise ValueError("the alignment holds no group with a mask in a person (no rows with densities)")
    if ax is None:
        fig, axes = _figure(1, 1, panel=0.42 * max(len(parts), 6) + 1.2)
        ax = axes[0]
        ax.axis("on")
    img = ax.imshow(np.where(np.isnan(D), 1.0, D).clip(0.25, 4), cmap="RdBu_r", norm=LogNorm(0.25, 4))
    ax.set_xticks(range(len(parts)), parts, rotation=90, fontsize=7)
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.set_xlabel("part mask", fontsize=8)
    ax.set_ylabel("caption group's map", fontsize=8)
    for i, g in enumerate(groups):
        for j, p in enumerate(parts):
            if not np.isnan(D[i, j]):
                ax.text(j, i, f"{D[i, j]:.1f}", ha="center", va="center", fontsize=5.5)
            if g == p:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.2, ec="black"))
    where = "" if isinstance(alignment, tuple) else f" ({res or max(alignment.resolutions)}x)"
    ax.set_title(title or f"density in each part / density on the person{where}", fontsize=8)
    bar = ax.figure.colorbar(img, ax=ax, fraction=0.04, pad=0.02, ticks=[0.25, 0.5, 1, 2, 4])
    bar.ax.set_yticklabels(["1/4", "1/2", "1", "2", "4"], fontsize=7)
    bar.ax.minorticks_off()
    ax.figure.tight_layout()
    return ax.figure


def plot_maps_on_parts(image: np.ndarray, maps: dict, ms, res: int, alpha: float = 0.55, cols: int = 6,
                       title: str | None = None):
    """Each group's map over the image with its own part's mask outlined (white): decomposition at a glance.

    maps {group name: (res, res) map}; ms a `masks.MaskSet` of the same image holding `res`."""
    H, W = np.asarray(image).shape[:2]
    fig, axes = _figure(len(maps) + 1, cols)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(overlay(image, m, alpha))
        if name in ms.names:
            ax.contour(upsample(ms.mask(name, res), (H, W)), levels=[0.5], colors="white", linewidths=1.0)
        ax.set_title(name, fontsize=8)
    fig.suptitle(title or f"group maps, {res}x{res}, own part outlined", fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure as PNG (parent folders created) and close it."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def png_bytes(fig, dpi: int = 90) -> bytes:
    """A figure as PNG bytes (for an ipywidgets Image), the figure closed."""
    import io

    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def attention_viewer(result, alpha: float = 0.55) -> Any:
    """An ipywidgets box to browse a result: step slider (when per-step), resolution buttons, group dropdown.

    The dropdown offers "all groups" (the group panel figure), each group, and "all tokens" (the token grid).
    """
    import ipywidgets as W
    n_steps = max(m.shape[0] for m in (result.group_maps or result.token_maps).values())
    choices = (["all groups"] if result.group_maps else []) + result.group_names + \
              (["all tokens"] if result.token_maps else [])
    step = W.IntSlider(value=n_steps - 1, min=0, max=n_steps - 1, description="step",
                       disabled=n_steps == 1, continuous_update=False)
    mean = W.Checkbox(value=n_steps == 1, description="mean over steps", disabled=n_steps == 1)
    res = W.ToggleButtons(options=[str(r) for r in result.resolutions], value=str(result.resolutions[-1]),
                          description="resolution")
    group = W.Dropdown(options=choices, value=choices[0], description="show")
    picture = W.Image(format="png")
    caption = W.HTML()

    def draw(_=None):
        r, s = int(res.value), None if mean.value else step.value
        t = "" if s is None or not result.timesteps or s >= len(result.timesteps) else f" (t={result.timesteps[s]:.0f})"
        if group.value == "all groups":
            fig = plot_group_maps(result, r, s, alpha)
        elif group.value == "all tokens":
            fig = plot_token_maps(result, r, s, alpha=alpha)
        else:
            _, maps = _pick(result.group_maps, r, s)
            fig, axes = _figure(1, 1, panel=3.2)
            axes[0].imshow(overlay(result.image, maps[result.group_names.index(group.value)], alpha))
            axes[0].set_title(group.value, fontsize=9)
        picture.value = png_bytes(fig)
        caption.value = f"<b>{group.value}</b> at {r}x{r}, {'mean over steps' if s is None else f'step {s}'}{t}"

    for w in (step, mean, res, group):
        w.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox([group, res]), W.HBox([step, mean]), caption, picture])
