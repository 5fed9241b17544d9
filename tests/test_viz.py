"""cosmiclite.viz: heat-map overlays, group/token figures, PNG output and the ipywidgets viewer."""
import numpy as np
import pytest
import torch

from cosmiclite import viz
from cosmiclite.attention import AttentionResult


@pytest.fixture
def result():
    g = torch.Generator().manual_seed(0)
    tokens = ["<|startoftext|>", "red", "hair", "<|endoftext|>"]
    tmaps = {r: torch.rand(2, 77, r, r, generator=g) for r in (4, 8)}
    spans = [("hair", (1, 3)), ("body", (0, 1))]
    gmaps = {r: torch.stack([m[:, s:e].mean(1) for _, (s, e) in spans], 1) for r, m in tmaps.items()}
    image = np.full((32, 32, 3), 200, np.uint8)
    return AttentionResult("red hair", tokens, spans, [900.0, 100.0], tmaps, gmaps, image)


def test_overlay_puts_the_hot_colour_where_the_map_peaks():
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0
    img = np.zeros((16, 16, 3), np.uint8)
    out = viz.overlay(img, heat, alpha=1.0, cmap="jet")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] > 100 and out[0, 0, 2] < 100      # jet's red at the peak
    assert out[15, 15, 2] > 100 and out[15, 15, 0] < 50   # jet's blue where the map is 0
    assert np.array_equal(viz.overlay(img, heat, alpha=0.0), img)
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(img, heat, alpha=2)


def test_figures_have_token_and_group_titles_and_save_png(result, tmp_path):
    fig = viz.plot_token_maps(result, res=8, step=1)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["0: <start>", "1: red", "2: hair", "3: <end>"]
    path = viz.save_figure(fig, tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = viz.plot_group_maps(result)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["image", "hair [1,3)", "body [0,1)"]
    with pytest.raises(ValueError, match="res=16"):
        viz.plot_group_maps(result, res=16)
    with pytest.raises(ValueError, match="step=5"):
        viz.plot_group_maps(result, step=5)


def test_viewer_redraws_on_every_control(result):
    box = viz.attention_viewer(result)
    (group, res), (step, mean), caption, picture = box.children[0].children, box.children[1].children, \
        box.children[2], box.children[3]
    assert picture.value[:4] == b"\x89PNG" and step.max == 1
    group.value = "hair"
    res.value = "4"
    step.value = 0
    assert caption.value == "<b>hair</b> at 4x4, step 0 (t=900)"
    mean.value = True
    assert "mean over steps" in caption.value
    group.value = "all tokens"
    assert picture.value[:4] == b"\x89PNG"
