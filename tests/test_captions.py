"""Captions composed from labels (Sec. 4.2, Fig. 3): text, groups and character offsets."""
import random
from pathlib import Path

import pytest

from cosmiclite.captions import Caption, compose, fill, group_phrases, random_annotation
from cosmiclite.protocol import Annotation, load_protocol

P = load_protocol()
SAMPLES = Path(__file__).parents[1] / "data_samples" / "annotations"


def test_fig3_example():
    c = compose(Annotation.load(SAMPLES / "fig3_example.json"))
    assert c.text == ("A full-body shot, an adult female, fit, small road with trees, straight red above-chest "
                      "hair, solid white long-sleeve cotton shirt, normal-length, collar, short plaid cotton skirt, "
                      "in pleated shape, ankle socks, black leather ankle oxford shoes, cotton backpack.")
    assert c.groups == ("body", "other", "hair", "tops", "bottoms", "legs", "shoes", "bag")
    assert c.phrases_of("bottoms") == ("short plaid cotton skirt", "in pleated shape")
    assert c.phrases[0].text == "A full-body shot" and c.phrases[0].group == "body"


def test_structure_of_random_captions():
    for seed in range(300):
        a = random_annotation(seed)
        c = compose(a)
        assert c == compose(a)  # deterministic
        if not c.phrases:
            assert c.text == ""
            continue
        assert c.text[0].isupper() and c.text.endswith(".")
        assert c.text == ", ".join(p.text for p in c.phrases) + "."
        for p in c.phrases:
            assert c.text[p.start:p.end] == p.text and p.text == p.text.strip() and "  " not in p.text
            assert p.group in P.group_names
        order = [P.group_names.index(g) for g in c.groups]
        assert order == sorted(order)  # protocol order
        runs = [p.group for i, p in enumerate(c.phrases) if i == 0 or c.phrases[i - 1].group != p.group]
        assert len(runs) == len(c.groups)  # each group's phrases are contiguous


def test_random_annotations_are_valid_and_reproducible():
    assert random_annotation(7) == random_annotation(7)
    assert random_annotation(random.Random(7)) == random_annotation(7)
    assert random_annotation(7) != random_annotation(8)
    for seed in range(50):
        a = random_annotation(seed)
        assert P.check(a.answers) == []
    a = random_annotation(0, p_unanswered=0, p_special=0, p_wear=1.0)
    assert len(a.answers) == 70 and all(a.answers[q] == "yes" for q in a.answers if q.startswith("wear_"))


def test_template_rules():
    # "{q|word}" falls back; all slots unanswered drops the phrase; the article agrees
    assert fill("{hat_color} {hat_type|hat}", {"hat_color": "red"}, P) == "red hat"
    assert fill("{hat_color} {hat_type|hat}", {}, P) == ""
    assert fill("a {age} {gender}", {"age": "adult", "gender": "female"}, P) == "an adult female"
    assert fill("a {age} {gender}", {"gender": "female"}, P) == "a female"
    assert fill("a {age} {gender}", {"age": "elderly"}, P) == "an elderly"
    assert fill("holding a {held_item}", {"held_item": "umbrella"}, P) == "holding an umbrella"
    assert fill("holding a {held_item}", {"held_item": "nothing"}, P) == ""  # word-less answer
    assert fill("a {shot_type}", {"shot_type": "upper body"}, P) == "an upper-body shot"
    assert fill("{bangs}", {"bangs": "no bangs"}, P) == ""


def test_wear_question_gates_the_group():
    base = {"wear_hat": "yes", "hat_type": "beret", "hat_color": "red"}
    assert group_phrases(Annotation(base), "hat") == ("red beret",)
    assert group_phrases(Annotation({"wear_hat": "yes"}), "hat") == ("hat",)  # worn, no details: the noun
    for wear in ("no", "not visible"):
        assert group_phrases(Annotation({"wear_hat": wear, "hat_type": "not applicable"}), "hat") == ()
    assert group_phrases(Annotation({"hat_type": "not visible", "wear_hat": "yes", "hat_color": "red"}), "hat") == ("red hat",)


def test_special_answers_write_nothing():
    c = compose({"age": "not visible", "gender": "male", "hair_color": "not applicable", "hair_style": "curly"})
    assert c.text == "A male, curly hair."


def test_group_order_and_drop():
    a = Annotation.load(SAMPLES / "fig3_example.json")
    base = compose(a)
    c = compose(a, group_order=["body", "shoes", "hair"])
    assert c.groups[:3] == ("body", "shoes", "hair")
    assert c.groups[3:] == tuple(g for g in base.groups if g not in ("body", "shoes", "hair"))
    assert sorted(p.text.lower() for p in c.phrases) == sorted(p.text.lower() for p in base.phrases)
    d = compose(a, drop=["bag", "other"])
    assert d.groups == tuple(g for g in base.groups if g not in ("bag", "other"))
    assert "backpack" not in d.text and "road" not in d.text
    assert compose(a, group_order=["hair"]).text.startswith("Straight red above-chest hair, a full-body shot")
    with pytest.raises(ValueError, match="unknown caption group 'shoe'"):
        compose(a, group_order=["shoe"])
    with pytest.raises(ValueError, match="unknown caption group"):
        compose(a, drop=["trousers"])
    with pytest.raises(ValueError, match="twice"):
        compose(a, group_order=["hair", "hair"])


def test_compose_validates_plain_dicts():
    from cosmiclite.protocol import AnnotationError
    with pytest.raises(AnnotationError, match="hair_color"):
        compose({"hair_color": "green"})


def test_from_phrases_and_to_dict():
    c = Caption.from_phrases([("body", "a woman"), ("hair", ""), ("hair", "red hair")])
    assert c.text == "A woman, red hair."
    assert c.to_dict() == {"caption": "A woman, red hair.", "phrases": [
        {"text": "A woman", "group": "body", "start": 0, "end": 7},
        {"text": "red hair", "group": "hair", "start": 9, "end": 17}]}
    assert Caption.from_phrases([]).text == ""
