"""Toy world: determinism, parsing/annotation agreement, colours, crops, left/right, biased sampling."""
import numpy as np
import pytest

from cosmiclite.protocol import NOT_APPLICABLE, NOT_VISIBLE, Annotation
from cosmiclite.toyworld import (
    BAG,
    BELT,
    COLORS,
    DRESS,
    FACE,
    HAIR,
    HAIR_COLORS,
    HAT,
    L_ARM,
    L_LEG,
    L_SHOE,
    PANTS,
    R_ARM,
    R_LEG,
    R_SHOE,
    SCARF,
    SKIN_TONES,
    SKIRT,
    SUNGLASSES,
    TOP,
    WORLD_ANSWERS,
    Sampling,
    SamplingError,
    colorize,
    contact_sheet,
    render,
)

SEEDS = range(400)
WEAR = {"wear_hat": [HAT], "wear_eyewear": [SUNGLASSES], "wear_top": [TOP], "wear_bottoms": [SKIRT, PANTS],
        "wear_dress": [DRESS], "wear_belt": [BELT], "wear_shoes": [L_SHOE, R_SHOE], "wear_bag": [BAG],
        "wear_scarf": [SCARF]}
COLOR_REGIONS = {"top_color": [TOP], "bottoms_color": [SKIRT, PANTS], "dress_color": [DRESS], "hat_color": [HAT],
                 "belt_color": [BELT], "shoes_color": [L_SHOE, R_SHOE], "bag_color": [BAG], "scarf_color": [SCARF]}


def nearest(rgb, table):
    names = list(table)
    d = ((np.array([table[n] for n in names], float) - rgb) ** 2).sum(1)
    return names[int(d.argmin())]


@pytest.fixture(scope="module")
def people():
    return [render(s) for s in SEEDS]


def test_deterministic_per_seed():
    a, b = render(7), render(7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.parsing, b.parsing)
    assert a.annotation.answers == b.annotation.answers
    assert not np.array_equal(render(8).image, a.image)


def test_shapes_types_and_sizes():
    for size in (32, 64, 100, 256):
        p = render(3, size)
        assert p.image.shape == (size, size, 3) and p.image.dtype == np.uint8
        assert p.parsing.shape == (size, size) and p.parsing.dtype == np.uint8
        assert p.parsing.max() <= 17
    for bad in (4, 257, 64.0):
        with pytest.raises(ValueError, match="size"):
            render(0, bad)
    with pytest.raises(ValueError, match="seed"):
        render(-1)


def test_every_annotation_validates_and_only_world_questions_are_answered(people):
    for p in people:
        a = p.annotation.answers
        Annotation(dict(a))  # validates again from scratch
        assert len(a) == 70
        for q, ans in a.items():
            if q not in WORLD_ANSWERS:
                assert ans == NOT_APPLICABLE, (p.seed, q, ans)
            elif ans not in (NOT_APPLICABLE, NOT_VISIBLE):
                assert ans in WORLD_ANSWERS[q], (p.seed, q, ans)


def test_worn_parts_have_pixels_and_absent_parts_have_none(people):
    for p in people:
        a = p.annotation.answers
        counts = np.bincount(p.parsing.ravel(), minlength=18)
        for q, labels in WEAR.items():
            px = counts[labels].sum()
            if a[q] == "yes":
                assert px > 0, (p.seed, q)
            if a[q] == "no" or p.worn[q] == "no":
                assert px == 0, (p.seed, q, px)
        if a["hair_length"] == "bald" or p.worn["hair_length"] == "bald":
            assert counts[HAIR] == 0, p.seed
        if a["hair_color"] in HAIR_COLORS:
            assert counts[HAIR] > 0, p.seed
        assert counts[FACE] > 0  # the head is always in the frame
        if a["leg_exposure"] == "covered legs":
            assert counts[[L_LEG, R_LEG]].sum() == 0, p.seed
        if a["leg_exposure"] in ("bare legs", "partly bare legs"):
            assert counts[[L_LEG, R_LEG]].sum() > 0, p.seed
        if a["arm_exposure"] == "bare arms":
            assert a["wear_top"] != "yes" or a["sleeve_length"] == "sleeveless"


def test_colour_answers_match_the_mean_colour_of_their_region(people):
    checked = 0
    for p in people:
        a = p.annotation.answers
        for q, labels in COLOR_REGIONS.items():
            if a[q] in COLORS:
                m = np.isin(p.parsing, labels)
                assert nearest(p.image[m].mean(0), COLORS) == a[q], (p.seed, q)
                checked += 1
        if a["hair_color"] in HAIR_COLORS:
            assert nearest(p.image[p.parsing == HAIR].mean(0), HAIR_COLORS) == a["hair_color"], p.seed
        assert nearest(p.image[p.parsing == FACE].mean(0), SKIN_TONES) == a["skin_tone"], p.seed
        if a["scene"] in ("plain wall", "studio backdrop"):
            assert nearest(p.image[p.parsing == 0].mean(0), COLORS) == a["background_color"], p.seed
    assert checked > 500


def test_crops_make_parts_not_visible(people):
    by_shot = {}
    for p in people:
        by_shot.setdefault(p.annotation.answers["shot_type"], []).append(p.annotation.answers)
    assert set(by_shot) == set(WORLD_ANSWERS["shot_type"])
    for a in by_shot["headshot"]:
        assert a["wear_shoes"] == NOT_VISIBLE and a["bottoms_type"] in (NOT_VISIBLE, NOT_APPLICABLE)
        assert a["body_shape"] == NOT_VISIBLE
    for a in by_shot["nearly full body"]:
        assert a["shoes_type"] in (NOT_VISIBLE, NOT_APPLICABLE) and a["leg_exposure"] == NOT_VISIBLE
        if a["bottoms_length"] == "full-length" or a["dress_length"] == "maxi":
            pytest.fail("a full-length hem is cut off in a nearly-full-body shot")
    for a in by_shot["full body"]:
        assert a["wear_shoes"] in ("yes", "no") and a["leg_exposure"] != NOT_VISIBLE


def test_small_shapes_are_answered_only_when_drawn_large_enough(people):
    """A neckline is 1-2 px in a 64-px full-body shot: "not visible" there, read at 256 px or close up."""
    for p in people:
        a = p.annotation.answers
        if a["shot_type"] in ("full body", "nearly full body"):
            assert a["collar"] in (NOT_VISIBLE, NOT_APPLICABLE)
        for q, labels in COLOR_REGIONS.items():  # a colour is answered only over at least 6 pixels
            if a[q] not in (NOT_VISIBLE, NOT_APPLICABLE):
                assert np.isin(p.parsing, labels).sum() >= 6, (p.seed, q)
    large = [render(s, size=256).annotation.answers for s in range(60)]
    assert any(a["shot_type"] == "full body" and a["collar"] not in (NOT_VISIBLE, NOT_APPLICABLE) for a in large)
    assert any(a["shot_type"] == "upper body" and a["collar"] not in (NOT_VISIBLE, NOT_APPLICABLE)
               for a in (p.annotation.answers for p in people))


def test_types_told_by_sub_pixel_shapes_are_read_only_close_up(people):
    """A cap's visor, a beanie's rim and the neckline that tells a long-sleeved shirt from a hoodie or a jacket
    are under a pixel high in a 64-px (nearly) full-body shot; a sun hat's brim and a t-shirt's or tank top's
    sleeves are not, so those types are still answered there."""
    small, told = {"hat_type": set(), "top_type": set()}, {"hat_type": set(), "top_type": set()}
    for p in people:
        a, w = p.annotation.answers, p.worn
        far = a["shot_type"] in ("full body", "nearly full body")
        for q in small:
            if far and w.get(q) and a[q] not in (NOT_VISIBLE, NOT_APPLICABLE):
                small[q].add(a[q])
            elif not far and a[q] not in (NOT_VISIBLE, NOT_APPLICABLE):
                told[q].add(a[q])
    assert small == {"hat_type": {"sun hat"}, "top_type": {"t-shirt", "tank top", "shirt"}}  # shirt: elbow sleeves
    assert told["hat_type"] == {"cap", "beanie", "sun hat"} and {"hoodie", "jacket"} <= told["top_type"]
    scarves = [p.annotation.answers for p in people if p.worn["wear_scarf"] == "yes"]
    assert len(scarves) > 40 and all(a["collar"] in (NOT_VISIBLE, NOT_APPLICABLE) for a in scarves)  # wrapped over it
    large = [render(s, size=256).annotation.answers for s in range(300)]  # drawn large, visors and necklines show
    far_caps = [a for a in large if a["shot_type"] in ("full body", "nearly full body") and a["wear_hat"] == "yes"]
    assert {a["hat_type"] for a in far_caps} == {"cap", "beanie", "sun hat"}
    assert any(a["top_type"] in ("hoodie", "jacket") for a in large if a["shot_type"] == "full body")


def _draw(outfit, v_top=-0.04, v_bot=0.32, size=64):
    """Paint an outfit in a fixed frame on a flat wall: (image, parsing)."""
    from cosmiclite.toyworld import _Canvas, _draw_person
    scale = size / (v_bot - v_top)
    cv = _Canvas(size, scale, -size / 2 / scale, v_top)
    _draw_person(cv, outfit)
    return cv.finish((200, 200, 200))


def test_a_portrait_cannot_tell_a_top_from_a_dress_so_it_does_not_say(people):
    """A dress's bodice is drawn as a t-shirt or tank top is: cut at the chest, the two images are the same
    pixels with different parsing labels, so neither "wear_top" nor "wear_dress" may be answered there."""
    differ = lambda a, b: (np.abs(a.astype(int) - b).sum(-1) > 30).sum()  # noqa: E731
    dress = [p for p in map(render, range(3000)) if p.worn["wear_dress"] == "yes"][:20]
    for p in dress:
        top = dict(p.worn, wear_dress="no", wear_top="yes", wear_bottoms="yes", top_color=p.worn["dress_color"],
                   top_pattern=p.worn["dress_pattern"], sleeve_length=p.worn["dress_sleeve"], collar="crew neck",
                   top_type="tank top" if p.worn["dress_sleeve"] == "sleeveless" else "t-shirt",
                   bottoms_type="skirt", bottoms_length="knee-length", skirt_shape="a-line",
                   bottoms_color=p.worn["dress_color"], bottoms_pattern="solid color")
        for v_bot in (0.30, 0.34):                                    # a portrait's frame bottoms
            (img_d, par_d), (img_t, par_t) = _draw(p.worn, v_bot=v_bot), _draw(top, v_bot=v_bot)
            assert differ(img_d, img_t) == 0 and (par_d == DRESS).sum() > 100 and (par_t == TOP).sum() > 100, p.seed
        (img_d, _), (img_t, _) = _draw(p.worn, v_bot=1.05), _draw(top, v_bot=1.05)   # the full figure differs
        assert differ(img_d, img_t) >= 6, p.seed
    garment = ("wear_top", "wear_dress", "top_color", "top_type", "collar", "dress_color", "dress_length")
    shots = {}
    for p in people:
        a = p.annotation.answers
        shots.setdefault(a["shot_type"], []).append(a)
    for a in shots["portrait"] + shots["headshot"]:
        assert a["wear_top"] == a["wear_dress"] == NOT_VISIBLE
        assert all(a[q] in (NOT_VISIBLE, NOT_APPLICABLE) for q in garment), a
    for a in shots["upper body"] + shots["full body"]:
        assert {a["wear_top"], a["wear_dress"]} == {"yes", "no"}


def test_a_belt_never_takes_the_colour_of_the_garments_it_sits_on():
    belts = [p.worn for p in map(render, range(1500)) if p.worn["wear_belt"] == "yes"]
    assert len(belts) > 200 and len({w["belt_color"] for w in belts}) == len(COLORS)
    for w in belts:
        assert w["belt_color"] not in (w.get("top_color"), w.get("bottoms_color"), w.get("dress_color")), w


def test_hats_bags_and_bottoms_never_take_the_colour_they_would_vanish_into():
    """A hat on hair of its colour or against a background of its colour, a bag on (straps) or beside a main
    garment or background of its colour, bottoms against a background of their colour (their outline tells a skirt
    from shorts) would be annotated yet not show; the world never draws them."""
    from cosmiclite.toyworld import VANISH_DIST
    far = lambda a, b: np.linalg.norm(np.subtract(a, b)) >= VANISH_DIST  # noqa: E731
    worn = [p.worn for p in map(render, range(1500))]
    hats = [w for w in worn if w["wear_hat"] == "yes"]
    bags = [w for w in worn if w["wear_bag"] == "yes"]
    assert len(hats) > 300 and len(bags) > 300
    assert len({w["hat_color"] for w in hats}) == len({w["bag_color"] for w in bags}) == len(COLORS)
    for w in hats:
        assert far(COLORS[w["hat_color"]], COLORS[w["background_color"]]), w
        assert w["hair_length"] == "bald" or far(COLORS[w["hat_color"]], HAIR_COLORS[w["hair_color"]]), w
    for w in bags:
        main = w.get("top_color") or w.get("dress_color")
        assert w["bag_color"] not in (main, w["background_color"]), w
    bottoms = [w for w in worn if w["wear_bottoms"] == "yes"]
    assert len(bottoms) > 900 and all(w["bottoms_color"] != w["background_color"] for w in bottoms)
    assert not any(w["hat_color"] == "beige" and w["hair_color"] == "blonde" for w in hats)  # 48 apart in RGB


def test_another_bottoms_type_or_skirt_shape_changes_the_picture(people, monkeypatch):
    """Where the annotation answers bottoms_type or skirt_shape, drawing the same person with another answer (same
    length) changes at least 5 pixels clearly: short shorts show the thighs in the notch between their hems (without
    it they drew as a short pencil skirt, 2-3 px apart in a full-body shot)."""
    import cosmiclite.toyworld as tw
    original = tw.sample_outfit

    def redrawn(seed, change):
        monkeypatch.setattr(tw, "sample_outfit", lambda rng, sampling: {**original(rng, sampling), **change})
        try:
            return render(seed).image
        finally:
            monkeypatch.setattr(tw, "sample_outfit", original)

    fewest = {}
    for p in people[:250]:
        a, w = p.annotation.answers, p.worn
        swaps = []
        if a["bottoms_type"] in WORLD_ANSWERS["bottoms_type"]:
            swaps += [("bottoms_type", {"bottoms_type": t, "skirt_shape": "pencil"}) for t in ("shorts", "skirt")
                      if t != a["bottoms_type"] and w["bottoms_length"] in tw.BOTTOMS_LENGTHS[t]]
        if a["skirt_shape"] in WORLD_ANSWERS["skirt_shape"]:
            swaps.append(("skirt_shape", {"skirt_shape": "a-line" if a["skirt_shape"] == "pencil" else "pencil"}))
        for q, change in swaps:
            differ = int((np.abs(p.image.astype(int) - redrawn(p.seed, change).astype(int)).sum(-1) > 30).sum())
            fewest[q] = min(fewest.get(q, differ), differ)
    assert set(fewest) == {"bottoms_type", "skirt_shape"}
    assert min(fewest.values()) >= 5, fewest


def test_left_parts_are_the_persons_left_on_the_image_right(people):
    n = 0
    for p in people:
        cols = np.arange(p.parsing.shape[1])[None, :]
        for left, right in ((L_ARM, R_ARM), (L_LEG, R_LEG), (L_SHOE, R_SHOE)):
            ml, mr = p.parsing == left, p.parsing == right
            if ml.sum() > 3 and mr.sum() > 3:
                assert (cols * ml).sum() / ml.sum() > (cols * mr).sum() / mr.sum(), (p.seed, left)
                n += 1
    assert n > 100


def test_contact_sheet_and_colorize(tmp_path):
    sheet = contact_sheet(range(4), tmp_path / "s.png", size=32, upscale=2, columns=2)
    assert (tmp_path / "s.png").is_file() and sheet.shape == (2 * (2 * 64 + 6), 2 * (64 + 2) + 2, 3)
    assert colorize(np.array([[0, 17]], np.uint8)).shape == (1, 2, 3)
    with pytest.raises(ValueError):
        colorize(np.array([[18]]))


def test_biased_sampling_and_held_out_combinations():
    never_red = Sampling(weights={"top_color": {"red": 0}})
    assert all(render(s, 32, never_red).worn.get("top_color") != "red" for s in range(150))
    mostly_red = Sampling(weights={"top_color": {"red": 50}, "wear_dress": {"yes": 0}})
    reds = sum(render(s, 32, mostly_red).worn["top_color"] == "red" for s in range(100))
    assert reds > 70
    held_out = Sampling(weights={"top_color": {"red": 20}, "bottoms_color": {"blue": 20}, "wear_dress": {"yes": 0}},
                        exclude=[{"top_color": "red", "bottoms_color": "blue"}])
    worn = [render(s, 32, held_out).worn for s in range(150)]
    assert not any(w["top_color"] == "red" and w["bottoms_color"] == "blue" for w in worn)
    assert sum(w["top_color"] == "red" for w in worn) > 30 and sum(w["bottoms_color"] == "blue" for w in worn) > 30


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": {"top_colour": {"red": 1}}}, "unknown question 'top_colour'"),
    ({"weights": {"top_color": {"teal": 1}}}, "'teal' of 'top_color' is not an answer of the protocol"),
    ({"weights": {"top_type": {"sweater": 1}}}, "'sweater' of 'top_type' is never drawn by the toy world"),
    ({"weights": {"top_material": {"silk": 1}}}, "does not draw 'top_material'"),
    ({"weights": {"top_color": {"red": -1}}}, "must be a finite number >= 0"),
    ({"weights": {"wear_hat": {"yes": 0, "no": 0}}}, "every answer has weight 0"),
    ({"exclude": {"top_color": "red"}}, "must be a list"),
    ({"exclude": [{"bottoms_color": "navy"}]}, "'navy' of 'bottoms_color'"),
])
def test_sampling_validation_errors_name_the_field(kwargs, match):
    with pytest.raises(SamplingError, match=match):
        Sampling(**kwargs)


def test_impossible_sampling_raises_a_clear_error():
    s = Sampling(weights={"wear_dress": {"no": 0}}, exclude=[{"wear_dress": "yes"}], max_tries=5)
    with pytest.raises(SamplingError, match="no person satisfies the sampling"):
        render(0, 32, s)
