"""The label protocol (Sec. 3.2.2): its shape, and that every bad annotation is reported clearly."""
import json
from pathlib import Path

import pytest

from cosmiclite.protocol import Annotation, AnnotationError, load_protocol

P = load_protocol()
SAMPLES = sorted((Path(__file__).parents[1] / "data_samples" / "annotations").glob("*.json"))


def test_shape_18_parts_70_questions_3_to_8_each():
    assert len(P.parts) == 18
    assert [p.atr_label for p in P.parts] == list(range(18))
    assert len(P.questions) == 70
    assert len(set(P.question_ids)) == 70
    for part in P.parts:
        assert 3 <= len(P.questions_of(part=part.id)) <= 8, part.id
    assert {q.kind for q in P.questions} == {"object", "texture", "shape"}


def test_shot_type_is_global_with_cosmicman_person_types():
    q = P.question("shot_type")
    assert q.is_global
    assert q.answers == ("full body", "nearly full body", "upper body", "portrait", "headshot")


def test_groups_and_masks():
    assert P.group_names[0] == "body" and P.group("body").atr_labels == tuple(range(1, 18))
    assert not P.group("other").has_mask
    assert P.group("shoes").atr_labels == (9, 10)
    assert P.group("bottoms").atr_labels == (5, 6)
    for q in P.questions:  # every question's group exists and every group has a question
        P.group(q.group)
    assert {q.group for q in P.questions} == set(P.group_names)


def _errors(answers):
    with pytest.raises(AnnotationError) as e:
        Annotation(answers)
    return str(e.value), e.value.errors


def _allowed(qid):
    return ", ".join(repr(a) for a in P.question(qid).answers)


@pytest.mark.parametrize("answers, qid, expect", [
    ({"hair_colour": "red"}, "hair_colour", "unknown"),                   # unknown question (typo)
    ({"hair_color": "green"}, "hair_color", "vocab"),                     # answer outside the vocabulary
    ({"hair_color": "Red"}, "hair_color", "vocab"),                       # case matters
    ({"shot_type": 3}, "shot_type", "vocab"),                             # wrong type
    ({"shot_type": ["full body"]}, "shot_type", "vocab"),                 # a list, not a string
    ({"wear_top": True}, "wear_top", "vocab"),                            # YAML-style boolean
    ({"gender": "not visible ", "age": "adult"}, "gender", "vocab"),      # special answer misspelt
    ({"wear_top": "no", "top_color": "red"}, "top_color", "requires"),    # requires violated
    ({"top_color": "red"}, "top_color", "requires"),                      # requires unanswered
    ({"wear_bottoms": "yes", "bottoms_type": "jeans", "skirt_shape": "pleated"}, "skirt_shape", "requires"),
])
def test_bad_answers_name_the_question_and_the_fix(answers, qid, expect):
    msg, errors = _errors(answers)
    assert len(errors) == 1, errors
    assert repr(qid) in msg
    if expect == "unknown":
        assert "cosmiclite protocol" in msg  # where to find the valid ids
    elif expect == "vocab":
        assert _allowed(qid) in msg and "'not visible', 'not applicable'" in msg
    else:
        dep, needed = P.question(qid).requires[0]
        assert repr(dep) in msg and repr(needed) in msg and "'not applicable'" in msg


def test_every_error_is_reported_at_once():
    _, errors = _errors({"hair_color": "green", "nope": "x", "shot_type": 1})
    assert len(errors) == 3


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('["hair_color", "red"]', "'answers' field"),
    ('{"hair_color": "red"}', "'answers' field"),
    ('{"answers": ["hair_color"]}', "mapping"),
    ('{"answers": {}, "labels": {}}', "'labels'"),
    ('{"answers": {"hair_color": "purple"}}', "'hair_color'"),
])
def test_bad_files(tmp_path, content, needle):
    f = tmp_path / "a.json"
    f.write_text(content)
    with pytest.raises(AnnotationError) as e:
        Annotation.load(f)
    assert needle in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Annotation.load(tmp_path / "missing.json")


def test_unknown_question_lookup_lists_the_questions():
    with pytest.raises(KeyError, match="hair_color"):
        P.question("hair_colour")


def test_special_answers_and_get():
    a = Annotation({"hair_color": "not visible", "wear_top": "no", "top_color": "not applicable", "age": "adult"})
    assert a.get("hair_color") is None and a.get("top_color") is None and a.get("age") == "adult"
    assert a.get("gender") is None  # unanswered
    with pytest.raises(KeyError):
        a.get("hair_colour")


def test_json_round_trip(tmp_path):
    a = Annotation({"age": "adult", "shot_type": "portrait", "wear_hat": "yes", "hat_type": "beret"},
                   image="img.png", source="test")
    a.save(tmp_path / "a.json")
    b = Annotation.load(tmp_path / "a.json")
    assert b == a and b.to_dict() == a.to_dict()
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved == {"answers": a.answers, "image": "img.png", "source": "test"}
    assert list(b.answers) == ["shot_type", "wear_hat", "hat_type", "age"]  # protocol order


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_annotations_are_valid(path):
    a = Annotation.load(path)
    assert len(a.answers) >= 20
