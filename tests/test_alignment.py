"""Where attention goes (cosmiclite.alignment): part specificity and the group x part matrix on constructed maps."""
import numpy as np
import pytest
import torch

from cosmiclite import toyworld
from cosmiclite.alignment import (
    Alignment,
    attention_alignment,
    part_densities,
    part_specificity,
    person_rows,
    training_view_maps,
)
from cosmiclite.captions import compose
from cosmiclite.discretize import discretize
from cosmiclite.masks import mask_set
from cosmiclite.models import build_pipeline


def _parts():
    """Two parts side by side on a 4x4 person that fills the top half of an 8x4 image."""
    own = torch.zeros(2, 8, 4)
    own[0, :4, :2] = 1
    own[1, :4, 2:] = 1
    return own, own.sum(0)


def test_a_map_on_its_own_part_is_far_above_one_a_silhouette_and_a_uniform_map_are_one():
    own, person = _parts()
    assert (part_specificity(own.clone(), own, person) > 1e6).all()
    assert part_specificity(person.expand(2, 8, 4), own, person) == pytest.approx(torch.ones(2))
    assert part_specificity(torch.full((2, 8, 4), 0.02), own, person) == pytest.approx(torch.ones(2))
    # lift cannot tell these apart: a silhouette lifts both parts as much as the map on each part does
    half = own.clone()
    half[0, :4, 2:] = 0.5    # part 0's map half on part 1: density 1 inside, 0.5 in the other part
    assert part_specificity(half, own, person)[0] == pytest.approx(2.0)


def test_part_densities_are_mass_per_unit_area_of_each_mask():
    own, _ = _parts()
    maps = torch.stack([own[0] * 3, torch.ones(8, 4)])
    D = part_densities(maps, own)
    assert D.flatten().tolist() == pytest.approx([3.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="share"):
        part_densities(maps, own[:, :4])


def test_matrix_is_ones_for_a_silhouette_and_diagonal_for_decomposed_maps():
    p = toyworld.render(20_000_010)  # upper body: hair, hat, tops, bottoms, belt, arms, bag
    ms = mask_set(p.parsing, sizes=(16,))
    d = discretize(compose(p.annotation))
    names = [g.name for g in d.groups if g.name in ms.names and ms.present[ms.names.index(g.name)]]
    assert len(names) >= 4
    body = ms.mask("body", 16)
    silhouette = torch.zeros(77, 16, 16)
    own = torch.zeros(77, 16, 16)
    for g in d.groups:
        s, e = g.span
        silhouette[s:e] = (body > 0).float()   # even over every cell the person touches
        if g.name in names:
            own[s:e] = ms.mask(g.name, 16)
    for maps, diag_high in ((silhouette, False), (own, True)):
        a = Alignment(person_rows(maps, ms, d, 16, 500, 0))
        groups, parts, D = a.matrix(16)
        assert groups[0] == "body" and "body" not in parts
        diag = np.array([D[groups.index(q), j] for j, q in enumerate(parts)])
        if diag_high:
            # soft 16x16 masks share their boundary cells, so a map equal to its own mask is not infinitely specific
            assert (diag > 1.5).all() and a.specificity(16) > 5
            assert all(v["specificity"] > 2 for g, v in a.by_group(16).items() if g != "body")
            assert "its own part" in a.describe()
        else:
            assert np.nanmax(np.abs(D - 1)) < 1e-5 and a.specificity(16) == pytest.approx(1.0)
            assert "share one map" in a.describe() and "on the person" in a.describe()


def test_attention_alignment_reports_specificity_and_the_matrix():
    torch.manual_seed(0)
    pipe = build_pipeline("toy")
    people = [toyworld.render(20_000_000 + i) for i in range(2)]
    a = attention_alignment(pipe, people, timesteps=(500,), resolutions=(16,), batch=2)
    d = a.to_dict()
    assert set(d) >= {"mean_mass", "mean_lift", "specificity", "matrix", "by_group"}
    assert d["matrix"]["res"] == 16 and len(d["matrix"]["values"]) == len(d["matrix"]["groups"])
    # an untrained UNet attends nearly uniformly: no part is singled out
    assert 0.8 < a.specificity(16) < 1.25
    assert all(r["specificity"] is None for r in a.rows if r["group"] == "body")


def test_training_view_maps_give_every_group_of_the_caption_a_map_and_the_mask_set():
    torch.manual_seed(0)
    pipe = build_pipeline("toy")
    person = toyworld.render(20_000_026)
    maps, ms, d = training_view_maps(pipe, person, timesteps=(500,), res=16)
    assert list(maps) == [g.name for g in d.groups] and "other" in maps
    assert all(m.shape == (16, 16) and (m >= 0).all() for m in maps.values())
    assert set(ms.masks) == {16} and ms.present[ms.names.index("tops")]
