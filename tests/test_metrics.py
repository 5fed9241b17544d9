"""Semantic accuracy (Sec. 5.1) on constructed cases whose answers are known."""
import math

import numpy as np
import pytest

from cosmiclite import Annotation
from cosmiclite.judge import OracleJudge
from cosmiclite.metrics import evaluate, semantic_accuracy

A = {"wear_top": "yes", "top_type": "t-shirt", "top_color": "red", "sleeve_length": "short sleeve",
     "wear_bottoms": "yes", "bottoms_type": "pants", "bottoms_color": "blue", "bottoms_length": "full-length",
     "wear_hat": "no", "hat_color": "not applicable", "hair_color": "black", "shoes_color": "not visible"}
B = {"wear_top": "yes", "top_type": "shirt", "top_color": "green", "sleeve_length": "long sleeve",
     "wear_bottoms": "yes", "bottoms_type": "shorts", "bottoms_color": "black", "bottoms_length": "short",
     "wear_hat": "yes", "hat_color": "red", "hair_color": "blonde"}


def refs():
    return [Annotation(dict(A)), Annotation(dict(B))]


def oracle_result(references, judged_from=None):
    judge = OracleJudge(judged_from or references)
    return evaluate(judge, [None] * len(references), references)


def test_self_judged_scores_one():
    r = oracle_result(refs())
    assert r.acc_obj == r.acc_tex == r.acc_shape == r.acc_all == r.acc_pooled == 1.0
    assert r.per_image == [1.0, 1.0]
    # special answers and unanswered questions are never asked
    assert r.question("hat_color").asked == 1
    with pytest.raises(KeyError, match="never asked"):
        r.question("shoes_color")
    assert r.asked == {"object": 10, "texture": 7, "shape": 4}


def test_changed_colour_lowers_tex_only():
    changed = refs()
    changed[0] = Annotation({**A, "top_color": "yellow"})
    r = oracle_result(changed, judged_from=refs())
    assert r.acc_obj == 1.0 and r.acc_shape == 1.0
    assert r.acc_tex == pytest.approx(6 / 7)
    assert r.question("top_color").accuracy == 0.5
    assert r.acc_all == pytest.approx((1 + 6 / 7 + 1) / 3)


def test_changed_bottoms_type_lowers_its_kind_only():
    changed = refs()
    changed[1] = Annotation({**B, "bottoms_type": "skirt"})   # the judge still sees shorts
    r = oracle_result(changed, judged_from=refs())
    from cosmiclite import load_protocol
    kind = load_protocol().question("bottoms_type").kind
    assert kind in ("object", "shape")
    assert r.by_kind[kind] < 1.0
    assert all(v == 1.0 for k, v in r.by_kind.items() if k != kind)
    assert r.question("bottoms_type").correct == 1


def test_acc_all_is_mean_of_kinds_not_pooled():
    judged = [dict(A), dict(B)]
    judged[0]["sleeve_length"] = "sleeveless"   # one shape answer wrong out of 4
    r = semantic_accuracy(judged, refs())
    assert r.acc_shape == 0.75
    assert r.acc_all == pytest.approx((1 + 1 + 0.75) / 3)
    assert r.acc_pooled == pytest.approx(20 / 21)
    assert r.acc_all != pytest.approx(r.acc_pooled)


def test_dsg_parent_rule():
    judged = [dict(A), dict(B)]
    judged[1]["wear_hat"] = "no"     # denies the hat but still 'knows' its colour
    dsg = semantic_accuracy(judged, refs(), parents="dsg")
    ind = semantic_accuracy(judged, refs(), parents="independent")
    assert ind.question("hat_color").correct == 1
    assert dsg.question("hat_color").correct == 0 and dsg.question("hat_color").parent_failures == 1
    assert dsg.acc_tex < ind.acc_tex and dsg.acc_obj == ind.acc_obj


def test_chance_levels():
    anns = [Annotation({"wear_hat": "no"})] * 3 + [Annotation({"wear_hat": "yes", "hat_color": "red"})]
    r = semantic_accuracy([a.answers for a in anns], anns)
    q = r.question("wear_hat")
    assert q.chance_uniform == 0.5
    assert q.chance_majority == 0.75 and q.majority_answer == "no"
    assert r.question("hat_color").chance_uniform == pytest.approx(1 / 12)
    assert r.question("hat_color").chance_majority == 1.0
    # a judge that always answers the majority scores exactly chance_majority
    always_no = [{"wear_hat": "no"}] * 4
    r2 = semantic_accuracy(always_no, anns, judge_questions=["wear_hat"])
    assert r2.question("wear_hat").accuracy == q.chance_majority
    assert r2.not_judged == {"hat_color": 1}


def test_missing_judge_answer_is_wrong_and_unknown_is_skipped():
    judged = [dict(A), {k: v for k, v in B.items() if k != "top_color"}]
    r = semantic_accuracy(judged, refs(), judge_questions=list(A))
    assert r.question("top_color").correct == 1 and r.question("top_color").asked == 2
    r2 = semantic_accuracy([dict(A), dict(B)], refs(), judge_questions=["top_color"])
    assert [q.id for q in r2.questions] == ["top_color"]
    assert math.isnan(r2.acc_obj) and r2.acc_all == r2.acc_tex == 1.0


def test_table_dict_and_plot():
    r = oracle_result(refs())
    t = r.table()
    for needle in ("top_color", "Acc_obj", "Acc_tex", "Acc_shape", "Acc_all", "unif%", "major%"):
        assert needle in t
    d = r.to_dict()
    assert d["acc_all"] == 1.0 and {q["id"] for q in d["questions"]} >= {"top_color", "bottoms_type"}
    assert all({"accuracy", "chance_uniform", "chance_majority"} <= set(q) for q in d["questions"])
    import matplotlib
    matplotlib.use("Agg")
    fig = r.plot()
    assert len(fig.axes[0].patches) == len(r.questions)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="judged has 1 images but references has 2"):
        semantic_accuracy([{}], refs())
    with pytest.raises(ValueError, match="parents"):
        semantic_accuracy([{}, {}], refs(), parents="strict")
    with pytest.raises(TypeError, match=r"references\[0\]"):
        semantic_accuracy([{}], [42])
    with pytest.raises(KeyError, match="not in the protocol"):
        semantic_accuracy([{}], [A], judge_questions=["shirt_colour"])
    with pytest.raises(ValueError, match="OracleJudge holds 2"):
        OracleJudge(refs()).answer([None])


def test_end_to_end_with_the_shipped_cnn_judge():
    """Held-out toy renders judged by the shipped CNN against their own annotations, then against
    annotations with one changed colour / bottoms type (seeds 6,000,000+: unseen in training)."""
    from cosmiclite import load_protocol
    from cosmiclite.judge import load_judge
    from cosmiclite.toyworld import render

    judge = load_judge()
    people = [render(s) for s in range(6_000_000, 6_000_100)]
    images = [p.image for p in people]
    truth = [p.annotation for p in people]
    r = evaluate(judge, images, truth)
    for k in ("object", "texture", "shape"):  # each kind well above what always-the-majority-answer scores
        rows = [q for q in r.questions if q.kind == k]
        floor = sum(q.chance_majority * q.asked for q in rows) / sum(q.asked for q in rows)
        assert r.by_kind[k] > floor + 0.1, (k, r.by_kind[k], floor)
    base = r.by_kind

    palette = load_protocol().question("top_color").answers
    recolored = [Annotation({**a.answers, "top_color": palette[(palette.index(a.answers["top_color"]) + 1) % 12]})
                 if a.get("top_color") else a for a in truth]
    rc = evaluate(judge, images, recolored)
    n_top = sum(1 for a in truth if a.get("top_color"))
    assert n_top >= 10
    assert rc.acc_tex < base["texture"] - 0.5 * n_top / r.asked["texture"]
    assert rc.acc_obj == base["object"] and rc.acc_shape == base["shape"]

    other = {"pants": "shorts", "shorts": "pants"}
    swapped = [Annotation({**a.answers, "bottoms_type": other[a.answers["bottoms_type"]]})
               if a.get("bottoms_type") in other else a for a in truth]
    rs = evaluate(judge, images, swapped)
    kind = load_protocol().question("bottoms_type").kind
    assert rs.by_kind[kind] < base[kind]
    assert all(rs.by_kind[k] == base[k] for k in base if k != kind)


def test_alignment_aggregates_by_group_with_area_as_the_uniform_level():
    from cosmiclite.metrics import Alignment
    a = Alignment([{"group": "hair", "mass": 0.5, "area": 0.1}, {"group": "hair", "mass": 0.3, "area": 0.1},
                   {"group": "tops", "mass": 0.2, "area": 0.4}])
    g = a.by_group()
    assert g["hair"]["mass"] == pytest.approx(0.4) and g["hair"]["lift"] == pytest.approx(4.0)
    assert g["tops"]["lift"] == pytest.approx(0.5) and g["tops"]["n"] == 1
    assert a.mean_mass == pytest.approx(0.3)   # groups weigh the same, whatever their row counts


def test_attention_alignment_measures_every_present_group_of_every_person():
    import torch

    from cosmiclite import toyworld
    from cosmiclite.masks import mask_set
    from cosmiclite.metrics import attention_alignment
    from cosmiclite.models import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline("toy")
    people = [toyworld.render(20_000_000 + i) for i in range(3)]
    a = attention_alignment(pipe, people, timesteps=(300, 700), resolutions=(8, 16), batch=2)
    assert {r["res"] for r in a.rows} == {8, 16} and {r["t"] for r in a.rows} == {300, 700}
    for k, p in enumerate(people):
        ms = mask_set(p.parsing, sizes=(16,))
        rows = [r for r in a.rows if r["person"] == k and r["res"] == 16 and r["t"] == 300]
        for r in rows:   # each row's area is that group's mask, and mass is a fraction
            assert r["area"] == pytest.approx(float(ms.mask(r["group"], 16).mean()))
            assert 0.0 <= r["mass"] <= 1.0 + 1e-6
        assert rows and "body" in {r["group"] for r in rows}


def test_chance_is_the_asked_weighted_uniform_guess_per_kind():
    from cosmiclite import load_protocol
    from cosmiclite.metrics import semantic_accuracy
    refs = [{"top_color": "red", "wear_top": "yes"}, {"top_color": "blue", "wear_top": "yes"},
            {"hair_length": "short"}]
    r = semantic_accuracy(refs, refs)
    p = load_protocol()
    assert r.chance["texture"] == pytest.approx(1 / len(p.question("top_color").answers))
    assert r.chance["object"] == pytest.approx(1 / 2)           # wear_top: yes / no
    assert r.chance["shape"] == pytest.approx(1 / len(p.question("hair_length").answers))
    assert r.chance["all"] == pytest.approx((r.chance["texture"] + 0.5 + r.chance["shape"]) / 3)


def test_paired_difference_tells_a_real_gap_from_noise():
    from cosmiclite.metrics import paired_difference
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 400)
    better = paired_difference(base + 0.1, base)              # every image 10 points better
    assert abs(better["mean"] - 0.1) < 1e-9 and better["ci95"][0] > 0.09 and better["images"] == 400
    noisy = paired_difference(base + rng.normal(0, 0.2, 400), base)
    lo, hi = noisy["ci95"]
    assert lo < 0 < hi and hi - lo < 0.06                     # no real gap: the interval holds 0
    assert paired_difference([0.5, float("nan")], [0.4, 0.3])["images"] == 1
    with pytest.raises(ValueError, match="same images"):
        paired_difference([0.5], [0.4, 0.3])
