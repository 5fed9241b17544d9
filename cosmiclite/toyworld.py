"""The toy world: procedurally drawn people whose parsing map and protocol answers are exact by construction.

CosmicMan-HQ (Sec. 3.3) pairs millions of photos with SCHP parsing maps and Annotate-Anyone answers.
No machine here reaches a model hub, so the kit carries a small world of its own: `render(seed)` draws
one front-facing person (64x64 by default, any size up to 256) and returns

* `image`   - uint8 (H, W, 3) RGB,
* `parsing` - uint8 (H, W) ATR labels 0..17, pixel-exact (each pixel is painted with its label),
* `annotation` - a `protocol.Annotation` answering all 70 questions.

How the answers are decided (the honesty rules):
* a question the world cannot show (materials, gender, expression, ...) is "not applicable", never guessed;
  `WORLD_ANSWERS` lists what the world draws for the others;
* a part cut off by the frame is "not visible": existence and colour need the part's pixels in frame
  (>= `present_px`), a pattern needs `detail_px` of them, and a length or type needs its end in frame
  (e.g. the length of full-length pants is "not visible" in a nearly-full-body shot), and the finest shapes
  (necklines, visors: `FINE_QUESTIONS`) need a drawing scale of `FINE_PX_PER_UNIT` pixels per body height;
* what the drawing cannot tell apart is not asked: a dress's bodice is drawn as a top is, so whether a
  person wears a top or a dress (and all that follows from it) needs the frame to reach the hips
  (`_GARMENT_TOLD_Y`); a belt never takes the colour of the garments it sits on, a hat that of the hair
  or the background, a bag that of the main garment or the background, bottoms that of the background
  (each would vanish: `_apart`); a scarf hides the neckline (collar "not visible"); and a cap, a beanie,
  a shirt, a hoodie and a jacket, told apart only by shapes under a pixel high in a small drawing (visor,
  rim, neckline), have their type read only at `FINE_PX_PER_UNIT` unless a coarse shape tells it
  (`_coarsely_told`);
* everything is a small, flat-coloured, clearly separated shape so that a 64x64 render really shows it.

Left and right follow the person (anatomical convention, as the LIP/ATR labels are used by SCHP, whose
LIP joints are derived from the parsing parts): "Left-arm"/"Left-leg"/"Left-shoe" is the person's left,
i.e. the *image right* of a front-facing person. ATR has no neck or torso-skin label; the neck and a
neckline's skin are given to Face (11). Hands are part of the arms.

Sampling can be biased: `Sampling(weights={"top_color": {"red": 0.05}})` makes red tops rare (long-tail
experiments) and `Sampling(exclude=({"top_color": "red", "bottoms_color": "blue"},))` holds a combination
out (compositional experiments); both are validated against the protocol and the world.

But: one front-facing pose (standing, arms down), no occlusion by other people, no lighting, no
anti-aliasing (the parsing map stays exact), a cartoon body. Real photos are a different distribution.

Why one module of ~900 lines: sampling an outfit, drawing it and answering the protocol about the drawing share
one world record and its geometry (what is in frame, at what scale, which colours stay apart), and the honesty
rules above are about how the three agree; split, each part would reach into the others' internals.
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .protocol import NOT_APPLICABLE, NOT_VISIBLE, Annotation, Protocol, load_protocol

# --- colours ----------------------------------------------------------------------------------------
# The protocol's 12 colour words, as clearly separated RGB values (a colour answer is checked against the
# nearest of these to its region's mean colour, patterns included).
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 28), "white": (240, 240, 236), "grey": (128, 128, 128), "red": (210, 30, 30),
    "orange": (245, 130, 20), "yellow": (245, 215, 30), "green": (40, 150, 50), "blue": (40, 90, 220),
    "purple": (130, 50, 170), "pink": (245, 130, 180), "brown": (120, 70, 30), "beige": (220, 195, 150),
}
HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (30, 26, 24), "brown": (105, 62, 28), "blonde": (235, 200, 105), "red": (190, 70, 30),
    "grey": (150, 150, 150), "white": (236, 236, 232), "blue": (50, 90, 210), "pink": (240, 120, 170),
}
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "light": (248, 218, 196), "medium": (206, 152, 110), "tan": (160, 108, 70), "dark": (90, 56, 38),
}

# ATR label values (protocol parts), named for readability.
BG, HAT, HAIR, SUNGLASSES, TOP, SKIRT, PANTS, DRESS, BELT, L_SHOE, R_SHOE, FACE, L_LEG, R_LEG, L_ARM, R_ARM, \
    BAG, SCARF = range(18)

# A parsing palette for pictures (one distinct colour per ATR label).
ATR_PALETTE = np.array([
    (0, 0, 0), (128, 0, 0), (255, 0, 0), (0, 85, 0), (170, 0, 51), (255, 85, 0), (0, 0, 85), (0, 119, 221),
    (85, 85, 0), (0, 85, 85), (85, 51, 0), (52, 86, 128), (0, 128, 0), (0, 0, 255), (51, 170, 221),
    (0, 255, 255), (85, 255, 170), (170, 255, 85)], dtype=np.uint8)

# --- what the world draws ---------------------------------------------------------------------------
_C = tuple(COLORS)
WORLD_ANSWERS: dict[str, tuple[str, ...]] = {
    "shot_type": ("full body", "nearly full body", "upper body", "portrait", "headshot"),
    "scene": ("plain wall", "studio backdrop", "street", "park", "beach", "indoor room"),
    "background_color": _C,
    "wear_hat": ("yes", "no"), "hat_type": ("cap", "beanie", "sun hat"), "hat_color": _C,
    "hair_color": tuple(HAIR_COLORS), "hair_length": ("bald", "short", "chin-length", "shoulder-length", "long"),
    "wear_eyewear": ("yes", "no"), "eyewear_type": ("sunglasses",), "lens_color": ("black",),
    "wear_top": ("yes", "no"), "top_type": ("t-shirt", "shirt", "hoodie", "jacket", "tank top"),
    "top_color": _C, "top_pattern": ("solid color", "striped", "plaid", "dotted"),
    "sleeve_length": ("sleeveless", "short sleeve", "elbow sleeve", "long sleeve"),
    "collar": ("crew neck", "v-neck", "collar", "hooded", "turtleneck"),
    "skirt_shape": ("a-line", "pencil"),
    "wear_bottoms": ("yes", "no"), "bottoms_type": ("pants", "shorts", "skirt"), "bottoms_color": _C,
    "bottoms_pattern": ("solid color", "striped", "plaid", "dotted"),
    "bottoms_length": ("short", "knee-length", "three-quarter", "full-length"),
    "wear_dress": ("yes", "no"), "dress_color": _C, "dress_pattern": ("solid color", "striped", "plaid", "dotted"),
    "dress_length": ("mini", "knee-length", "midi", "maxi"),
    "wear_belt": ("yes", "no"), "belt_color": _C,
    "wear_shoes": ("yes", "no"), "shoes_type": ("sneakers", "boots"), "shoes_color": _C,
    "shoes_length": ("low-top", "ankle", "mid-calf", "knee-high"),
    "skin_tone": tuple(SKIN_TONES), "body_shape": ("slim", "average", "heavy"),
    "leg_exposure": ("bare legs", "partly bare legs", "covered legs"),
    "arm_exposure": ("bare arms", "partly bare arms", "covered arms"),
    "wear_bag": ("yes", "no"), "bag_type": ("backpack", "handbag", "crossbody bag"), "bag_color": _C,
    "wear_scarf": ("yes", "no"), "scarf_color": _C,
}

# Default sampling weights where they are not uniform.
_DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "wear_dress": {"yes": 0.25, "no": 0.75}, "wear_hat": {"yes": 0.3, "no": 0.7},
    "wear_eyewear": {"yes": 0.2, "no": 0.8}, "wear_belt": {"yes": 0.25, "no": 0.75},
    "wear_shoes": {"yes": 0.92, "no": 0.08}, "wear_bag": {"yes": 0.3, "no": 0.7},
    "wear_scarf": {"yes": 0.2, "no": 0.8},
    "top_pattern": {"solid color": 0.55, "striped": 0.15, "plaid": 0.15, "dotted": 0.15},
    "bottoms_pattern": {"solid color": 0.7, "striped": 0.1, "plaid": 0.1, "dotted": 0.1},
    "dress_pattern": {"solid color": 0.55, "striped": 0.15, "plaid": 0.15, "dotted": 0.15},
    "hair_length": {"bald": 0.06, "short": 0.3, "chin-length": 0.2, "shoulder-length": 0.2, "long": 0.24},
}

# Geometry, in person units: y = 0 at the top of the head, 1 at the soles; x = 0 on the body's midline,
# positive to the image right (the person's left).
SHOULDER_Y, WAIST_Y, HIP_Y, KNEE_Y, SHOE_TOP_Y, SOLE_Y = 0.16, 0.44, 0.5, 0.72, 0.93, 1.0
# (v_top range, v_bottom range) of the frame for each shot type (Sec. 3.3's "shot type" by scale and crop).
SHOTS = {
    "full body": ((-0.12, -0.05), (1.02, 1.10)),
    "nearly full body": ((-0.07, -0.04), (0.86, 0.90)),
    "upper body": ((-0.06, -0.04), (0.53, 0.58)),
    "portrait": ((-0.05, -0.035), (0.30, 0.34)),
    "headshot": ((-0.045, -0.03), (0.14, 0.15)),
}
TOP_SLEEVES = {"t-shirt": ("short sleeve",), "shirt": ("elbow sleeve", "long sleeve"),
               "hoodie": ("long sleeve",), "jacket": ("long sleeve",), "tank top": ("sleeveless",)}
TOP_COLLARS = {"t-shirt": ("crew neck", "v-neck"), "shirt": ("crew neck", "v-neck", "turtleneck"),
               "hoodie": ("hooded",), "jacket": ("collar",), "tank top": ("crew neck", "v-neck")}
SLEEVE_END = {"sleeveless": None, "short sleeve": 0.245, "elbow sleeve": 0.32, "long sleeve": 0.45}
BOTTOMS_LENGTHS = {"pants": ("three-quarter", "full-length"), "shorts": ("short", "knee-length"),
                   "skirt": ("short", "knee-length", "full-length")}
HEM_Y = {"short": 0.6, "knee-length": 0.72, "three-quarter": 0.84, "full-length": 0.955,
         "mini": 0.6, "midi": 0.84, "maxi": 0.955}
HAIR_END = {"bald": 0.0, "short": 0.06, "chin-length": 0.125, "shoulder-length": 0.2, "long": 0.34}
BOOT_TOP = {"low-top": SHOE_TOP_Y, "ankle": 0.87, "mid-calf": 0.8, "knee-high": 0.70}
WIDTH = {"slim": 0.82, "average": 1.0, "heavy": 1.32}


class SamplingError(ValueError):
    """Sampling weights or exclusions that do not fit the protocol or the world."""


@dataclass(frozen=True)
class Sampling:
    """Biased sampling of the toy world (long-tailed and held-out compositions).

    weights: question id -> {answer: weight}; named answers replace their default weight (1 for most,
             see `_DEFAULT_WEIGHTS`), unnamed ones keep it. Weight 0 never draws that answer.
    exclude: combinations never drawn, each a {question id: answer} that must not all hold at once, judged
             on what the person *wears* (so a held-out pair never appears, even cropped out of frame).
    max_tries: re-draws (from the same seeded generator) before giving up on a too-narrow sampling.
    """
    weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    exclude: Sequence[Mapping[str, str]] = ()
    max_tries: int = 200

    def __post_init__(self):
        protocol = load_protocol()
        errors = []

        def check_answer(where: str, qid: str, answer: str):
            try:
                q = protocol.question(qid)
            except KeyError as e:
                errors.append(f"{where}: {e.args[0]}")
                return
            if qid not in WORLD_ANSWERS:
                errors.append(f"{where}: the toy world does not draw {qid!r} (it is always answered "
                              f"{NOT_APPLICABLE!r}); questions it draws: {', '.join(WORLD_ANSWERS)}")
            elif answer is not None and answer not in WORLD_ANSWERS[qid]:
                kind = "is not an answer of the protocol" if answer not in q.answers else "is never drawn by the toy world"
                errors.append(f"{where}: answer {answer!r} of {qid!r} {kind}; use one of "
                              f"{', '.join(WORLD_ANSWERS[qid])}")

        if not isinstance(self.weights, Mapping):
            raise SamplingError("Sampling.weights must be a dict of question id -> {answer: weight}")
        for qid, ws in self.weights.items():
            if not isinstance(ws, Mapping):
                errors.append(f"weights[{qid!r}] must be a dict of answer -> weight, got {type(ws).__name__}")
                continue
            for a, w in ws.items():
                check_answer(f"weights[{qid!r}]", qid, a)
                if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    errors.append(f"weights[{qid!r}][{a!r}] = {w!r}: a weight must be a finite number >= 0")
            if qid in WORLD_ANSWERS and not errors:
                total = sum(ws.get(a, _default_weight(qid, a)) for a in WORLD_ANSWERS[qid])
                if total <= 0:
                    errors.append(f"weights[{qid!r}]: every answer has weight 0; give at least one a weight > 0")
        if isinstance(self.exclude, Mapping) or isinstance(self.exclude, str):
            raise SamplingError("Sampling.exclude must be a list of {question id: answer} dicts, e.g. "
                                "[{'top_color': 'red', 'bottoms_color': 'blue'}]")
        for k, combo in enumerate(self.exclude):
            if not isinstance(combo, Mapping) or not combo:
                errors.append(f"exclude[{k}] must be a non-empty dict of question id -> answer")
                continue
            for qid, a in combo.items():
                check_answer(f"exclude[{k}]", qid, a)
        if not isinstance(self.max_tries, int) or self.max_tries < 1:
            errors.append(f"max_tries = {self.max_tries!r}: must be an int >= 1")
        if errors:
            raise SamplingError("invalid toy-world sampling:\n  " + "\n  ".join(errors))
        object.__setattr__(self, "_tables", {})  # cumulative weights per (question, allowed answers)

    def weight(self, qid: str, answer: str) -> float:
        return float(self.weights.get(qid, {}).get(answer, _default_weight(qid, answer)))

    def excluded(self, worn: Mapping[str, str]) -> bool:
        return any(all(worn.get(q) == a for q, a in combo.items()) for combo in self.exclude)


def _default_weight(qid: str, answer: str) -> float:
    return _DEFAULT_WEIGHTS.get(qid, {}).get(answer, 1.0)


@dataclass
class Person:
    """One render: image (H,W,3) uint8, parsing (H,W) uint8 ATR labels, its annotation, and the seed.

    `worn` holds what the person wears and looks like before cropping (the latent outfit): the
    annotation is `worn` filtered through what the frame shows.
    """
    image: np.ndarray
    parsing: np.ndarray
    annotation: Annotation
    seed: int
    worn: dict = field(default_factory=dict, repr=False)


class _Uniforms:
    """Uniform draws from a seeded numpy Generator, fetched 64 at a time (one numpy call per batch
    instead of one per draw: the renderer makes ~40 draws per person)."""

    def __init__(self, seed: int):
        self._gen = np.random.default_rng(seed)
        self._buf: list[float] = []

    def random(self) -> float:
        if not self._buf:
            self._buf = self._gen.random(64).tolist()[::-1]
        return self._buf.pop()

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def integers(self, lo: int, hi: int) -> int:
        """An int in [lo, hi)."""
        return lo + min(int(self.random() * (hi - lo)), hi - lo - 1)


class _Reject(Exception):
    """A draw ruled out by the sampling (all weights 0 among the allowed answers, or an excluded combo)."""


def _pick(rng: _Uniforms, sampling: Sampling, qid: str, allowed: Sequence[str] | None = None) -> str:
    """Draw one answer of `qid` among `allowed` (default: all the world draws) by the sampling's weights."""
    key = (qid, allowed)
    table = sampling._tables.get(key)
    if table is None:  # cumulative weights, computed once per sampling and question
        options = tuple(allowed if allowed is not None else WORLD_ANSWERS[qid])
        cum = list(itertools.accumulate(sampling.weight(qid, a) for a in options))
        table = sampling._tables[key] = (options, cum)
    options, cum = table
    if cum[-1] <= 0:
        raise _Reject(qid)
    return options[min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(options) - 1)]


_SCENE_COLORS = {"street": "grey", "park": "green", "beach": "blue"}   # the colour a scene's background is named
VANISH_DIST = 60.0   # RGB distance under which two flat colours read as one (the closest two of COLORS: 76)


@lru_cache(maxsize=4096)
def _apart(*rgbs: tuple[int, int, int]) -> tuple[str, ...]:
    """The colour words whose RGB is at least VANISH_DIST from every one of `rgbs`: an item drawn on top of
    (or beside) something of a colour too close to its own would not show, yet its annotation would say it."""
    return tuple(c for c, v in COLORS.items() if all(math.dist(v, r) >= VANISH_DIST for r in rgbs))


def sample_outfit(rng: _Uniforms, sampling: Sampling) -> dict:
    """Draw the latent person: question id -> answer for everything the world draws (before cropping)."""
    p = lambda qid, allowed=None: _pick(rng, sampling, qid, allowed)  # noqa: E731
    w: dict[str, str] = {"shot_type": p("shot_type"), "scene": p("scene"), "skin_tone": p("skin_tone"),
                         "body_shape": p("body_shape"), "hair_length": p("hair_length")}
    # the background's colour where a scene fixes it; elsewhere (walls) it is drawn last, apart from what it frames
    scene_rgb = [COLORS[c] for c in (_SCENE_COLORS.get(w["scene"]),) if c]
    w["hair_color"] = p("hair_color") if w["hair_length"] != "bald" else NOT_APPLICABLE
    w["wear_dress"] = p("wear_dress")
    if w["wear_dress"] == "yes":
        w.update(wear_top="no", wear_bottoms="no", dress_color=p("dress_color"),
                 dress_pattern=p("dress_pattern"), dress_length=p("dress_length"))
    else:
        w.update(wear_top="yes", wear_bottoms="yes")
        w["top_type"] = p("top_type")
        w["sleeve_length"] = p("sleeve_length", TOP_SLEEVES[w["top_type"]])
        w["collar"] = p("collar", TOP_COLLARS[w["top_type"]])
        w["top_color"], w["top_pattern"] = p("top_color"), p("top_pattern")
        w["bottoms_type"] = p("bottoms_type")
        w["bottoms_length"] = p("bottoms_length", BOTTOMS_LENGTHS[w["bottoms_type"]])
        # the bottoms' outline against the background tells their type and shape: never the background's colour
        w["bottoms_color"], w["bottoms_pattern"] = p("bottoms_color", _apart(*scene_rgb)), p("bottoms_pattern")
        if w["bottoms_type"] == "skirt":
            w["skirt_shape"] = p("skirt_shape")
    w["wear_belt"] = p("wear_belt")
    if w["wear_belt"] == "yes":  # a belt the colour of the garments it sits on would not show: it differs from them
        under = [COLORS[w[q]] for q in ("top_color", "bottoms_color", "dress_color") if q in w]
        w["belt_color"] = p("belt_color", _apart(*under))
    w["wear_shoes"] = p("wear_shoes")
    if w["wear_shoes"] == "yes":
        hem = HEM_Y[w.get("dress_length") or w["bottoms_length"]]
        # boots only where their shaft shows (legs bare below the knee), so their type is visible
        w["shoes_type"] = p("shoes_type", ("sneakers", "boots") if hem <= KNEE_Y + 0.01 else ("sneakers",))
        w["shoes_length"] = p("shoes_length", ("low-top",) if w["shoes_type"] == "sneakers"
                              else ("ankle", "mid-calf", "knee-high"))
        w["shoes_color"] = p("shoes_color")
    hair_rgb = [HAIR_COLORS[w["hair_color"]]] if w["hair_length"] != "bald" else []
    w["wear_hat"] = p("wear_hat")
    if w["wear_hat"] == "yes":  # a hat the colour of the hair or the background it sits on would vanish
        w["hat_type"], w["hat_color"] = p("hat_type"), p("hat_color", _apart(*hair_rgb, *scene_rgb))
    w["wear_eyewear"] = p("wear_eyewear")
    if w["wear_eyewear"] == "yes":
        w["eyewear_type"], w["lens_color"] = p("eyewear_type"), p("lens_color")
    w["wear_bag"] = p("wear_bag")
    main = w.get("top_color") or w.get("dress_color")
    if w["wear_bag"] == "yes":  # straps lie on the main garment, the bag hangs against the background
        w["bag_type"], w["bag_color"] = p("bag_type"), p("bag_color", _apart(COLORS[main], *scene_rgb))
        w["bag_side"] = ("left", "right")[int(rng.random() < 0.5)]  # the person's side it hangs on
    w["wear_scarf"] = p("wear_scarf")
    if w["wear_scarf"] == "yes":
        w["scarf_color"] = p("scarf_color")
    # the background's colour: scenes have their own; a wall differs from the main garment, bottoms, hat and bag
    if w["scene"] in _SCENE_COLORS:
        w["background_color"] = p("background_color", (_SCENE_COLORS[w["scene"]],))
    else:
        framed = [COLORS[w[q]] for q in ("bottoms_color", "hat_color", "bag_color") if q in w]
        w["background_color"] = p("background_color", _apart(COLORS[main], *framed))
    # exposure follows from the garments
    sleeve = w.get("sleeve_length", "sleeveless")
    if w["wear_dress"] == "yes":
        w["dress_sleeve"] = ("sleeveless", "short sleeve")[int(rng.random() < 0.4)]
        sleeve = w["dress_sleeve"]
    w["arm_exposure"] = {"sleeveless": "bare arms", "long sleeve": "covered arms"}.get(sleeve, "partly bare arms")
    hem = HEM_Y[w.get("dress_length") or w["bottoms_length"]]
    shoe_top = BOOT_TOP[w["shoes_length"]] if w["wear_shoes"] == "yes" else SOLE_Y
    bare = max(0.0, shoe_top - hem)
    w["leg_exposure"] = "covered legs" if bare < 0.005 else "partly bare legs" if bare < 0.25 else "bare legs"
    for qid in ("arm_exposure", "leg_exposure"):
        if sampling.weight(qid, w[qid]) <= 0:
            raise _Reject(qid)
    if sampling.excluded(w):
        raise _Reject("exclude")
    return w


# --- drawing ----------------------------------------------------------------------------------------
class _Canvas:
    """A pixel grid seen in person units, painted with *materials* (an ATR label + an RGB colour each).

    Shapes are recorded, not drawn: each is a run of pixel rows whose left/right edges are
    x = c + s*y -/+ e*sqrt(1 - ((y - cy)/ry)^2) (a trapezoid when e = 0, an ellipse when s = 0), and
    `finish` rasterises all of them at once: every (shape, row) pair becomes a span of columns, every
    span a run of pixels, and each pixel keeps the last shape painted over it (painter's order,
    `np.maximum.at` over the shape number). Some 30 numpy calls per person instead of ~12 per shape:
    the speed target is >= 1,000 people/s at 64x64 on one core. A pixel belongs to a shape when its
    centre lies inside it, so the parsing map is exact; colour and label come from look-up tables.
    """

    def __init__(self, size: int, scale: float, x_left: float, v_top: float):
        self.size, self.scale, self.x_left, self.v_top = size, scale, x_left, v_top
        self.labels, self.colors = [BG], [(0, 0, 0)]
        self._ids: dict = {}
        self.patterns: list[tuple[int, str, int]] = []
        self.shapes: list[tuple] = []

    def material(self, label: int, rgb, pattern: str = "solid color") -> int:
        key = (label, rgb, pattern)
        m = self._ids.get(key)
        if m is None:
            m = self._ids[key] = len(self.labels)
            self.labels.append(label)
            self.colors.append(rgb)
            if pattern != "solid color":  # its second colour is a material of its own
                self.labels.append(label)
                self.colors.append(_shade(rgb))
                self.patterns.append((m, pattern, m + 1))
        return m

    def _add(self, m: int, y0: float, y1: float, c_l: float, s_l: float, c_r: float, s_r: float,
             e: float = 0.0, cy: float = 0.0, ry: float = 1.0) -> None:
        s, t = self.scale, self.v_top
        i0 = max(0, math.ceil((y0 - t) * s - 0.5))
        i1 = min(self.size, math.ceil((y1 - t) * s - 0.5))
        if i0 < i1:
            self.shapes.append((m, i0, i1, c_l, s_l, c_r, s_r, e, cy, ry))

    def rect(self, m: int, x0, x1, y0, y1) -> None:
        self._add(m, y0, y1, x0, 0.0, x1, 0.0)

    def trapezoid(self, m: int, y0, y1, xl0, xr0, xl1, xr1) -> None:
        """Rows y0..y1; the left/right edges run linearly from (xl0, xr0) at y0 to (xl1, xr1) at y1."""
        k = 1.0 / max(y1 - y0, 1e-6)
        s_l, s_r = (xl1 - xl0) * k, (xr1 - xr0) * k
        self._add(m, y0, y1, xl0 - s_l * y0, s_l, xr0 - s_r * y0, s_r)

    def ellipse(self, m: int, cx, cy, rx, ry, y_to: float = 9.0) -> None:
        self._add(m, cy - ry, min(cy + ry, y_to), cx, 0.0, cx, 0.0, rx, cy, ry)

    def limb(self, m: int, ax, ay, bx, by, r, y_to: float = 9.0) -> None:
        """A limb (or strap) from A to B, `r` wide on each side horizontally, cut at row y_to (sleeves)."""
        s_ = (bx - ax) / (by - ay)
        self._add(m, ay, min(by, y_to), ax - r - s_ * ay, s_, ax + r - s_ * ay, s_)

    def rasterise(self) -> np.ndarray:
        """The material map (H, W) uint8: all recorded shapes painted in order, patterns applied."""
        n, s = self.size, self.scale
        top = np.zeros(n * n, np.uint8)  # 1 + the index of the last shape over each pixel (0: none)
        if self.shapes:
            P = np.array(self.shapes, np.float64)
            i0, i1 = P[:, 1].astype(np.int64), P[:, 2].astype(np.int64)
            rows_per = i1 - i0
            sid = np.repeat(np.arange(len(P)), rows_per)           # shape of each (shape, row) pair
            row = np.arange(len(sid)) - np.repeat(np.cumsum(rows_per) - rows_per, rows_per) + i0[sid]
            y = (row + 0.5) / s + self.v_top
            c_l, s_l, c_r, s_r, e, cy, ry = P[sid, 3:].T
            q = e * np.sqrt(np.clip(1.0 - ((y - cy) / ry) ** 2, 0.0, None))
            jl = np.clip(np.ceil((c_l + s_l * y - q - self.x_left) * s - 0.5), 0, n).astype(np.int64)
            jr = np.clip(np.ceil((c_r + s_r * y + q - self.x_left) * s - 0.5), 0, n).astype(np.int64)
            length = np.maximum(jr - jl, 0)
            start = row * n + jl
            pix = np.arange(int(length.sum())) + np.repeat(start - (np.cumsum(length) - length), length)
            np.maximum.at(top, pix, np.repeat((sid + 1).astype(np.uint8), length))
        shape_mat = np.array([0] + [sh[0] for sh in self.shapes], np.uint8)
        mat = shape_mat[top].reshape(n, n)
        for m, pattern, m2 in self.patterns:
            sel = mat == m
            sel &= _pattern_mask(n, pattern)
            mat[sel] = m2
        return mat

    def finish(self, background: np.ndarray | tuple) -> tuple[np.ndarray, np.ndarray]:
        """(image, parsing): `background` is an RGB array or, for a flat wall, one RGB colour."""
        mat = self.rasterise()
        labels = np.array(self.labels, np.uint8)[mat]
        colors = np.array(self.colors, np.uint8)
        if isinstance(background, tuple):  # a flat wall: one table look-up does it all
            colors[0] = background
            return colors[mat], labels
        person = mat != 0
        background[person] = colors[mat[person]]
        return background, labels


@lru_cache(maxsize=64)
def _pattern_mask(size: int, pattern: str) -> np.ndarray:
    """Where a pattern's second colour goes, in frame pixels (about a third of the area for each pattern:
    one stripe row in three, plaid lines every fifth row and column, 2x2 dots every fourth pixel)."""
    k = max(1, round(size / 64))
    ii = (np.arange(size) // k)[:, None]
    jj = (np.arange(size) // k)[None, :]
    if pattern == "striped":
        m = np.broadcast_to(ii % 3 == 0, (size, size))
    elif pattern == "plaid":
        m = (ii % 5 == 0) | (jj % 5 == 0)
    elif pattern == "dotted":
        m = ((ii % 4) < 2) & ((jj % 4) < 2)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; the toy world draws striped, plaid and dotted")
    m = np.ascontiguousarray(m)
    m.flags.writeable = False
    return m


def _shade(rgb, strength: float = 1.0) -> tuple[int, int, int]:
    """A pattern's second colour: a darker shade of the garment (a lighter one for black), so the region's
    mean colour stays nearest to the garment's colour word (tested for every colour and pattern)."""
    c = np.asarray(rgb, float)
    lum = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
    if lum < 60:
        out = c + 0.3 * strength * (255 - c)
    else:
        out = c * (1 - (0.3 if lum >= 180 else 0.45) * strength)
    return tuple(int(v) for v in out)


@lru_cache(maxsize=16)
def _studio_gain(n: int) -> np.ndarray:
    rows = (np.arange(n) + 0.5) / n
    return np.where(rows < 0.72, 1.08 - 0.12 * rows, 0.9)[:, None, None]


@lru_cache(maxsize=16)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n, dtype=np.float32)[:, None], np.arange(n, dtype=np.float32)[None, :]


def _background(n: int, scene: str, color: str, rng: _Uniforms) -> np.ndarray:
    """Frame-space backgrounds: a wall colour, a studio sweep, or a simple scene (uint8 (n, n, 3))."""
    base = np.asarray(COLORS[color], float)
    if scene == "plain wall":
        return COLORS[color]  # a flat colour: `_Canvas.finish` fills it in with one look-up
    img = np.empty((n, n, 3), np.uint8)
    if scene == "studio backdrop":  # a vertical sweep: lighter at the top, a darker floor at the bottom
        img[:] = np.clip(base * _studio_gain(n), 0, 255)
    elif scene == "indoor room":  # a wall, a window, a wooden floor
        img[:] = COLORS[color]
        wx = int(rng.integers(0, max(1, n // 2)))
        img[int(0.1 * n):int(0.38 * n), wx:wx + n // 4] = (170, 210, 240)
        img[int(0.8 * n):] = (150, 105, 60)
    elif scene == "street":  # sky, grey buildings, a dark road
        img[:] = (150, 190, 230)
        x = 0
        while x < n:
            w = int(rng.integers(max(1, n // 6), max(2, n // 3)))
            top = int(rng.uniform(0.05, 0.35) * n)
            g = int(rng.integers(105, 150))
            img[top:int(0.8 * n), x:x + w] = (g, g, g + 4)
            x += w + 1
        img[int(0.8 * n):] = (70, 70, 75)
    elif scene == "park":  # sky, round tree tops, grass
        img[:int(0.3 * n)] = (150, 200, 240)
        img[int(0.3 * n):] = (70, 160, 60)
        yy, xx = _grid(n)
        h = int(0.5 * n)
        for _ in range(3):
            cx, r = rng.uniform(0, n), rng.uniform(0.1, 0.2) * n
            img[:h][(xx - cx) ** 2 + (yy[:h] - 0.3 * n) ** 2 <= r * r] = (40, 115, 45)
    elif scene == "beach":  # sky, sea, sand
        img[:int(0.45 * n)] = (90, 150, 235)
        img[int(0.45 * n):int(0.68 * n)] = (30, 80, 200)
        img[int(0.68 * n):] = (225, 200, 150)
    else:
        raise ValueError(f"unknown scene {scene!r}; scenes: {', '.join(WORLD_ANSWERS['scene'])}")
    return img


def _draw_person(cv: _Canvas, w: dict) -> None:
    """Paint the person back to front; labels are ATR values, x > 0 is the person's left (image right)."""
    bw = WIDTH[w["body_shape"]]
    skin = SKIN_TONES[w["skin_tone"]]
    dress = w["wear_dress"] == "yes"
    if dress:
        g = cv.material(DRESS, COLORS[w["dress_color"]], w["dress_pattern"])
    else:
        g = cv.material(TOP, COLORS[w["top_color"]], w["top_pattern"])
    face = cv.material(FACE, skin)
    sh_x, waist_x, hip_x = 0.085 * bw, 0.066 * bw, 0.078 * bw
    leg_x, leg_r0, leg_r1 = 0.04 * bw, 0.034 * bw, 0.022 * (0.5 + 0.5 * bw)
    hl = w["hair_length"]
    hair = cv.material(HAIR, HAIR_COLORS[w["hair_color"]]) if hl != "bald" else 0

    # 1. things behind the body: a backpack, long hair's back
    if w["wear_bag"] == "yes" and w["bag_type"] == "backpack":
        cv.rect(cv.material(BAG, COLORS[w["bag_color"]]), -sh_x - 0.03, sh_x + 0.03, 0.2, 0.42)
    if hl in ("shoulder-length", "long"):
        cv.trapezoid(hair, 0.06, HAIR_END[hl], -0.062, 0.062, -0.07, 0.07)

    # 2. legs, shoes, bottoms (or the dress's skirt)
    shod = w["wear_shoes"] == "yes"
    for side, leg_label, shoe_label in ((-1, R_LEG, R_SHOE), (1, L_LEG, L_SHOE)):
        cx = side * leg_x
        cv.trapezoid(cv.material(leg_label, skin), HIP_Y - 0.02, SHOE_TOP_Y + 0.02, cx - leg_r0, cx + leg_r0,
                     cx - leg_r1, cx + leg_r1)
        foot = cv.material(shoe_label, COLORS[w["shoes_color"]]) if shod else cv.material(leg_label, skin)
        toe = cx + side * 0.012
        cv.ellipse(foot, toe, SOLE_Y - 0.03, 0.036, 0.03)
        cv.rect(foot, cx - leg_r1 - 0.004, cx + leg_r1 + 0.004, SHOE_TOP_Y - 0.004, SOLE_Y - 0.03)
        if shod and w["shoes_type"] == "boots":
            cv.rect(foot, cx - leg_r1 - 0.008, cx + leg_r1 + 0.008, BOOT_TOP[w["shoes_length"]], SOLE_Y - 0.03)
    if not dress:
        b_label = SKIRT if w["bottoms_type"] == "skirt" else PANTS
        b = cv.material(b_label, COLORS[w["bottoms_color"]], w["bottoms_pattern"])
        hem = HEM_Y[w["bottoms_length"]]
        if w["bottoms_type"] == "skirt":
            flare = (0.1 if w["skirt_shape"] == "a-line" else 0.012) * (hem - WAIST_Y) / 0.3
            cv.trapezoid(b, WAIST_Y - 0.01, hem, -waist_x - 0.004, waist_x + 0.004, -hip_x - 0.01 - flare,
                         hip_x + 0.01 + flare)
        else:
            cv.trapezoid(b, WAIST_Y - 0.01, HIP_Y + 0.06, -waist_x - 0.004, waist_x + 0.004, -hip_x - 0.004,
                         hip_x + 0.004)
            t = (hem - HIP_Y) / (SHOE_TOP_Y - HIP_Y)
            r_end = leg_r0 + (leg_r1 - leg_r0) * t + 0.008
            for side in (-1, 1):
                cx = side * leg_x
                cv.trapezoid(b, HIP_Y - 0.01, hem, cx - leg_r0 - 0.008, cx + leg_r0 + 0.008, cx - r_end, cx + r_end)
            if w["bottoms_type"] == "shorts" and w["leg_exposure"] != "covered legs":
                # the inner thighs in the notch between the legs' hems (boots up to the hem cover them): without it
                # short shorts on touching thighs drew as a short pencil skirt, 2-3 px apart in a full-body shot
                wh = 0.03 * bw
                for side, leg_label in ((-1, R_LEG), (1, L_LEG)):
                    cv.trapezoid(cv.material(leg_label, skin), hem - 0.08, hem, 0, 0, min(0, side * wh),
                                 max(0, side * wh))
    else:
        hem = HEM_Y[w["dress_length"]]
        spread = 0.03 + 0.07 * (hem - WAIST_Y) / 0.5
        cv.trapezoid(g, WAIST_Y - 0.02, hem, -waist_x - 0.004, waist_x + 0.004, -hip_x - spread, hip_x + spread)

    # 3. torso (top or bodice), its neckline, a jacket's opening, the belt
    cv.trapezoid(g, SHOULDER_Y, WAIST_Y + 0.025, -sh_x, sh_x, -waist_x - 0.006, waist_x + 0.006)  # dresses too
    cv.ellipse(g, 0, SHOULDER_Y + 0.014, sh_x, 0.018)  # round shoulders
    collar = w.get("collar", "crew neck")
    if collar == "v-neck":
        cv.trapezoid(face, SHOULDER_Y - 0.005, 0.235, -0.032, 0.032, -0.002, 0.002)
    elif collar in ("crew neck", "hooded"):
        cv.ellipse(face, 0, SHOULDER_Y - 0.002, 0.03, 0.02)
    elif collar == "collar":  # a jacket: lapels open on a shirt (a shade of the jacket, so its mean colour holds)
        cv.trapezoid(cv.material(TOP, _shade(COLORS[w["top_color"]])), SHOULDER_Y - 0.005, 0.3, -0.03, 0.03, -0.004, 0.004)
        cv.ellipse(face, 0, SHOULDER_Y - 0.002, 0.022, 0.016)
    if w["wear_belt"] == "yes":
        cv.rect(cv.material(BELT, COLORS[w["belt_color"]]), -waist_x - 0.008, waist_x + 0.008, WAIST_Y - 0.016,
                WAIST_Y + 0.022)

    # 4. arms (sleeves in the garment's material), hands
    sleeve = w.get("sleeve_length") if not dress else w.get("dress_sleeve")
    end = SLEEVE_END.get(sleeve)
    arm_r = 0.021 * (0.6 + 0.4 * bw)
    for side, label in ((-1, R_ARM), (1, L_ARM)):
        arm = cv.material(label, skin)
        ax, bx = side * (sh_x + 0.006), side * (sh_x + 0.03 * bw + 0.014)
        cv.ellipse(arm, ax, SHOULDER_Y + 0.026, arm_r, 0.02)
        cv.limb(arm, ax, SHOULDER_Y + 0.026, bx, 0.45, arm_r)
        if end is not None:
            cv.ellipse(g, ax, SHOULDER_Y + 0.024, arm_r + 0.004, 0.02)
            cv.limb(g, ax, SHOULDER_Y + 0.024, bx, 0.45, arm_r + 0.004, y_to=end)
        cv.ellipse(arm, bx, 0.465, 0.019, 0.025)

    # 5. bags in front
    if w["wear_bag"] == "yes":
        bag = cv.material(BAG, COLORS[w["bag_color"]])
        side = 1 if w["bag_side"] == "left" else -1
        hx = side * (sh_x + 0.03 * bw + 0.014)
        if w["bag_type"] == "handbag":
            cv.rect(bag, hx - 0.008, hx + 0.008, 0.44, 0.49)  # the handle in the hand
            cv.trapezoid(bag, 0.48, 0.57, hx - 0.035, hx + 0.035, hx - 0.045, hx + 0.045)
        elif w["bag_type"] == "crossbody bag":
            cv.limb(bag, -side * (sh_x - 0.02), SHOULDER_Y - 0.002, side * (hip_x - 0.02), WAIST_Y + 0.03, 0.012)
            cv.rect(bag, side * hip_x - 0.04, side * hip_x + 0.04, WAIST_Y + 0.02, WAIST_Y + 0.09)
        else:  # the backpack's straps over both shoulders
            for s in (-1, 1):
                cv.rect(bag, s * 0.05 - 0.012, s * 0.05 + 0.012, SHOULDER_Y - 0.004, 0.34)

    # 6. neck (or turtleneck), the hood around it, the head and its face
    if collar == "turtleneck":
        cv.rect(g, -0.027, 0.027, 0.112, SHOULDER_Y + 0.006)
    else:
        cv.rect(face, -0.022, 0.022, 0.112, SHOULDER_Y)
    if collar == "hooded":
        cv.trapezoid(g, 0.115, SHOULDER_Y + 0.01, -0.064, -0.022, -0.08, -0.022)
        cv.trapezoid(g, 0.115, SHOULDER_Y + 0.01, 0.022, 0.064, 0.022, 0.08)
    cv.ellipse(face, 0, 0.068, 0.052, 0.066)
    eye = cv.material(FACE, (40, 30, 30))
    for s in (-1, 1):
        cv.ellipse(eye, s * 0.02, 0.066, 0.0085, 0.0075)
    cv.ellipse(cv.material(FACE, (165, 60, 60)), 0, 0.102, 0.016, 0.0055)

    # 7. a scarf around the neck, one end hanging
    if w["wear_scarf"] == "yes":
        scarf = cv.material(SCARF, COLORS[w["scarf_color"]])
        cv.trapezoid(scarf, 0.125, 0.172, -0.046, 0.046, -0.056, 0.056)
        cv.rect(scarf, 0.008, 0.042, 0.16, 0.27)

    # 8. hair: the top, then the sides
    if hl != "bald":
        cv.ellipse(hair, 0, 0.036, 0.057, 0.041, y_to=0.036)  # the crown
        cv.rect(hair, -0.054, 0.054, 0.02, 0.036)  # the hairline above the forehead
        if hl == "short":
            for s in (-1, 1):
                cv.rect(hair, s * 0.05 - 0.009, s * 0.05 + 0.009, 0.03, HAIR_END["short"])
        else:
            for s in (-1, 1):
                cv.trapezoid(hair, 0.03, HAIR_END[hl], s * 0.047 - 0.013, s * 0.047 + 0.013, s * 0.057 - 0.016,
                             s * 0.057 + 0.016)

    # 9. hat, sunglasses
    if w["wear_hat"] == "yes":
        hat = cv.material(HAT, COLORS[w["hat_color"]])
        ht = w["hat_type"]
        if ht == "beanie":
            cv.ellipse(hat, 0, 0.03, 0.059, 0.052, y_to=0.03)
            cv.rect(cv.material(HAT, _shade(COLORS[w["hat_color"]], 0.6)), -0.059, 0.059, 0.024, 0.042)  # the rim
        elif ht == "sun hat":
            cv.ellipse(hat, 0, 0.012, 0.046, 0.042)
            cv.ellipse(hat, 0, 0.03, 0.118, 0.02)
        else:  # a cap: a dome, and a visor to one side
            cv.ellipse(hat, 0, 0.034, 0.057, 0.042, y_to=0.034)
            cv.ellipse(hat, 0.05, 0.034, 0.048, 0.009)
    if w["wear_eyewear"] == "yes":
        glasses = cv.material(SUNGLASSES, (15, 15, 18))
        for s in (-1, 1):
            cv.ellipse(glasses, s * 0.021, 0.066, 0.019, 0.013)
        cv.rect(glasses, -0.004, 0.004, 0.061, 0.067)


# --- which answers the frame shows ------------------------------------------------------------------
_GROUP_QUESTIONS = {  # a worn item: its label(s), its questions answered by pixels, by detail, by geometry
    "hat": ((HAT,), ("wear_hat", "hat_color"), (), ("hat_type",)),
    "eyewear": ((SUNGLASSES,), ("wear_eyewear", "eyewear_type", "lens_color"), (), ()),
    "top": ((TOP,), ("wear_top", "top_color"), ("top_pattern",), ("top_type", "sleeve_length", "collar")),
    "bottoms": ((SKIRT, PANTS), ("wear_bottoms", "bottoms_color"), ("bottoms_pattern",),
                ("bottoms_type", "bottoms_length", "skirt_shape")),
    "dress": ((DRESS,), ("wear_dress", "dress_color"), ("dress_pattern",), ("dress_length",)),
    "belt": ((BELT,), ("wear_belt", "belt_color"), (), ()),
    "shoes": ((L_SHOE, R_SHOE), ("wear_shoes", "shoes_color"), (), ("shoes_type", "shoes_length")),
    "bag": ((BAG,), ("wear_bag", "bag_color"), (), ("bag_type",)),
    "scarf": ((SCARF,), ("wear_scarf", "scarf_color"), (), ()),
    "hair": ((HAIR,), ("hair_color",), (), ("hair_length",)),
}
# Shapes a few hundredths of the body tall (necklines, a cap's visor, a beanie's rim): readable from this drawing
# scale up (pixels per person height; ~55 in a 64-pixel full-body shot, ~105 in an upper-body one). A shirt, a
# hoodie and a jacket differ only at the neckline, a cap and a beanie only by visor and rim.
FINE_QUESTIONS = frozenset({"collar", "hat_type", "top_type"})
FINE_PX_PER_UNIT = 90.0


def _coarsely_told(qid: str, w: dict) -> bool:
    """Whether a fine question's answer shows at any scale all the same: a sun hat by its wide brim, a top type
    by its sleeves when no other type has them (a t-shirt's short, a tank top's none)."""
    if qid == "hat_type":
        return w["hat_type"] == "sun hat"
    if qid == "top_type":
        return sum(w["sleeve_length"] in sleeves for sleeves in TOP_SLEEVES.values()) == 1
    return False


# A dress's bodice is drawn as a top is (same outline, neckline and sleeves): which of the two a person wears
# shows only from the waist down (the top's hem over the bottoms, or the dress's skirt). Above that frame
# bottom every top and dress question is "not visible" (a portrait shows a garment, not which one).
_GARMENT_TOLD_Y = HIP_Y
# Where an item's absence can be seen: the frame bottom (v_bot) must reach this y.
_ABSENCE_VISIBLE = {"hat": -1, "eyewear": -1, "top": _GARMENT_TOLD_Y, "bottoms": 0.53, "dress": _GARMENT_TOLD_Y,
                    "belt": 0.47, "shoes": SOLE_Y, "bag": 0.57, "scarf": 0.3, "hair": -1}


def _geometry_visible(qid: str, w: dict, v_bot: float) -> bool:
    """Whether a type/length/shape answer can be read off the frame (the part's telling end is in it)."""
    inside = lambda y: y <= v_bot - 0.015  # noqa: E731
    if qid == "hat_type":
        return True
    if qid in ("top_type", "collar"):
        return inside(0.28)
    if qid == "sleeve_length":
        return inside(0.47)
    if qid == "bottoms_type":
        return inside(0.68)
    if qid in ("bottoms_length", "skirt_shape"):
        return inside(HEM_Y[w["bottoms_length"]]) and inside(0.68)
    if qid == "dress_length":
        return inside(HEM_Y[w["dress_length"]])
    if qid in ("shoes_type", "shoes_length"):
        return inside(SOLE_Y)
    if qid == "bag_type":
        return inside(0.57)
    if qid == "hair_length":
        return inside(HAIR_END[w["hair_length"]])
    raise KeyError(qid)


def annotate(w: dict, parsing: np.ndarray, v_bot: float, protocol: Protocol | None = None,
             px_per_unit: float = float("inf")) -> Annotation:
    """Answers for what the frame shows: the latent outfit `w` filtered by the pixels and the crop.

    `v_bot` is the lowest person-unit row in the frame (y = 1 at the soles); `px_per_unit` is the drawing
    scale (pixels per person height): the fine shapes in `FINE_QUESTIONS` are read only at `FINE_PX_PER_UNIT`
    or more (a neckline is 1-2 pixels in a 64-pixel full-body shot).
    """
    protocol = protocol or load_protocol()
    n = parsing.shape[0]
    counts = np.bincount(parsing.ravel(), minlength=18).tolist()
    present_px = max(6, round(6 * (n / 64) ** 2))
    detail_px = max(20, round(24 * (n / 64) ** 2))
    a = dict(_not_applicable(protocol))
    a["shot_type"], a["scene"], a["background_color"] = w["shot_type"], w["scene"], w["background_color"]
    a["skin_tone"] = w["skin_tone"]
    inside = lambda y: y <= v_bot - 0.015  # noqa: E731
    a["body_shape"] = w["body_shape"] if inside(0.5) else NOT_VISIBLE
    a["arm_exposure"] = w["arm_exposure"] if inside(0.47) else NOT_VISIBLE
    a["leg_exposure"] = w["leg_exposure"] if inside(SOLE_Y) else NOT_VISIBLE
    for item, (labels, by_pixels, by_detail, by_geometry) in _GROUP_QUESTIONS.items():
        wear_q = by_pixels[0] if item != "hair" else None
        if item == "hair":
            if w["hair_length"] == "bald":  # the length is seen on a bare head; there is no colour
                a["hair_length"] = "bald" if w["wear_hat"] != "yes" else NOT_VISIBLE
                continue
        elif w[wear_q] != "yes":
            a[wear_q] = "no" if inside(_ABSENCE_VISIBLE[item]) else NOT_VISIBLE
            continue
        if item == "bottoms" and w["bottoms_type"] != "skirt":
            by_geometry = by_geometry[:2]  # skirt_shape stays "not applicable"
        px = sum(counts[k] for k in labels)
        told = item not in ("top", "dress") or inside(_GARMENT_TOLD_Y)   # which garment it is, if it is one of those
        if px < present_px or not told:
            for q in (*by_pixels, *by_detail, *by_geometry):
                a[q] = NOT_VISIBLE
            continue
        for q in by_pixels:
            a[q] = w[q] if q != wear_q else "yes"
        for q in by_detail:
            a[q] = w[q] if px >= detail_px else NOT_VISIBLE
        for q in by_geometry:
            a[q] = w[q] if _geometry_visible(q, w, v_bot) else NOT_VISIBLE
        if px_per_unit < FINE_PX_PER_UNIT:
            for q in FINE_QUESTIONS.intersection(by_geometry):
                if not _coarsely_told(q, w):
                    a[q] = NOT_VISIBLE
    if w["wear_scarf"] == "yes" and a["collar"] != NOT_APPLICABLE:
        a["collar"] = NOT_VISIBLE  # the scarf is wrapped over the neckline
    return Annotation(a, protocol=protocol)


_NA_TEMPLATES: dict[int, dict] = {}


def _not_applicable(protocol: Protocol) -> dict:
    """Every question answered "not applicable" (a template copied per person)."""
    t = _NA_TEMPLATES.get(id(protocol))
    if t is None:
        t = _NA_TEMPLATES[id(protocol)] = {q: NOT_APPLICABLE for q in protocol.question_ids}
    return t


# --- the public API ---------------------------------------------------------------------------------
def render(seed: int, size: int = 64, sampling: Sampling | None = None) -> Person:
    """Draw person number `seed` (deterministic) at `size` x `size` pixels (8..256).

    Sec. 3.3 pairs each image with its parsing map and protocol answers; here both are exact by
    construction: the parsing map is what was painted, the annotation what the frame shows of it.
    """
    if not isinstance(size, (int, np.integer)) or not 8 <= size <= 256:
        raise ValueError(f"size = {size!r}: the toy world renders square images of 8 to 256 pixels; "
                         "pass e.g. size=64")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed = {seed!r}: pass a non-negative integer")
    sampling = sampling or _DEFAULT_SAMPLING
    rng = _Uniforms(int(seed))
    for _ in range(sampling.max_tries):
        try:
            w = sample_outfit(rng, sampling)
            break
        except _Reject:
            continue
    else:
        raise SamplingError(f"seed {seed}: no person satisfies the sampling after {sampling.max_tries} draws; "
                            "the weights/exclusions rule out (nearly) everything - loosen them or raise max_tries")
    (t0, t1), (b0, b1) = SHOTS[w["shot_type"]]
    v_top, v_bot = rng.uniform(t0, t1), rng.uniform(b0, b1)
    scale = size / (v_bot - v_top)
    reach = 0.17 * scale  # body half-width in pixels (arms, hat brim, bag)
    room = max(0.0, size / 2 - reach)
    cx = size / 2 + rng.uniform(-0.8, 0.8) * room + rng.uniform(-0.04, 0.04) * size
    cv = _Canvas(int(size), scale, -cx / scale, v_top)
    background = _background(int(size), w["scene"], w["background_color"], rng)
    _draw_person(cv, w)
    image, parsing = cv.finish(background)
    ann = annotate(w, parsing, v_bot, px_per_unit=scale)
    return Person(image, parsing, ann, int(seed), w)


_DEFAULT_SAMPLING = Sampling()


def colorize(parsing: np.ndarray) -> np.ndarray:
    """An ATR parsing map as an RGB picture (`ATR_PALETTE`)."""
    parsing = np.asarray(parsing)
    if parsing.max(initial=0) >= len(ATR_PALETTE):
        raise ValueError(f"parsing holds label {int(parsing.max())}; ATR labels are 0..17")
    return ATR_PALETTE[parsing]


def contact_sheet(seeds: Sequence[int] | int = 16, path: str | Path | None = None, size: int = 64,
                  upscale: int = 3, columns: int = 8, sampling: Sampling | None = None) -> np.ndarray:
    """A grid of renders, each with its parsing map below it (uint8 RGB); saved as PNG when `path` is given."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("contact_sheet needs at least one seed")
    columns = max(1, min(columns, len(seeds)))
    rows = -(-len(seeds) // columns)
    cell, gap = size * upscale, 2
    sheet = np.full((rows * (2 * cell + 3 * gap), columns * (cell + gap) + gap, 3), 255, np.uint8)
    for k, s in enumerate(seeds):
        p = render(s, size, sampling)
        r, c = divmod(k, columns)
        y, x = r * (2 * cell + 3 * gap) + gap, c * (cell + gap) + gap
        up = lambda a: np.repeat(np.repeat(a, upscale, 0), upscale, 1)  # noqa: E731
        sheet[y:y + cell, x:x + cell] = up(p.image)
        sheet[y + cell + gap:y + 2 * cell + gap, x:x + cell] = up(colorize(p.parsing))
    if path is not None:
        from PIL import Image
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sheet).save(path)
    return sheet
