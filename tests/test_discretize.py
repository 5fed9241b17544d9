"""Discretization (Sec. 4.2): exact token spans for composed captions, a lexicon for free text."""
import json
import warnings

import pytest

from cosmiclite.captions import Caption, compose, random_annotation
from cosmiclite.discretize import (
    Discretizer,
    TruncationWarning,
    discretize,
    discretize_batch,
    discretize_text,
    discretize_text_batch,
    discretizer,
)
from cosmiclite.protocol import Annotation
from cosmiclite.tokenizer import clip_tokenizer, sdxl_tokenizers

TOK = clip_tokenizer()


def squash(s):
    """Compare text up to what CLIP's decode changes: case and spaces ("full-body" decodes "full - body")."""
    return "".join(s.lower().split())


@pytest.fixture(scope="module")
def random_captions():
    return [compose(random_annotation(seed)) for seed in range(600)]


def test_composed_spans_are_exact(random_captions):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        out = discretize_batch(random_captions)
        ref = discretizer().discretize_by_offsets(random_captions)
    sd_ids = TOK([c.text for c in random_captions], padding="max_length", truncation=True, max_length=77)["input_ids"]
    n_lost = 0
    for c, d, r, ids in zip(random_captions, out, ref, sd_ids):
        assert list(d.input_ids) == ids  # the phrase cache reproduces the tokenizer's own ids exactly
        assert d == r                    # and the spans of the offsets path
        assert d.caption == c.text
        prev_end = 1
        for g in d.groups:
            s, e = g.span
            assert prev_end <= s < e <= 76  # ordered, disjoint, never over the start/end tokens
            prev_end = e
            assert g.phrases == c.phrases_of(g.name)
            assert TOK.decode(d.input_ids[s:e]).count(",") == len(g.phrases) - 1
            assert squash(TOK.decode(d.input_ids[s:e])) == squash(", ".join(g.phrases))
            assert list(d.input_ids[s:e]) == TOK(", ".join(g.phrases), add_special_tokens=False)["input_ids"]
        assert {g.name for g in d.groups} | set(d.lost_groups) == set(c.groups)
        n_lost += bool(d.lost_groups)
    assert n_lost > 0  # the sample includes over-long captions, so truncation was exercised too


def _long_caption(k, tail="red shirt"):
    """Body: k tokens ("cat" x k), then one tops phrase and one shoes phrase."""
    return Caption.from_phrases([("body", " ".join(["cat"] * k)), ("tops", tail), ("shoes", "black boots")])


def test_group_that_just_fits_is_kept():
    with pytest.warns(TruncationWarning, match=r"\['shoes'\]"):
        d = discretize(_long_caption(72))  # tops ends at 1 + 72 + 1 + 2 = 76, the last place before the end token
    assert d.span("tops") == (74, 76) and d.lost_groups == ("shoes",)
    assert d.input_ids[76] == 49407 and len(d.input_ids) == 77


def test_partly_cut_group_is_lost_not_shortened():
    with pytest.warns(TruncationWarning) as w:
        d = discretize(_long_caption(73))  # tops would span [75, 77): one token cut
    assert d.span("tops") is None and d.lost_groups == ("tops", "shoes")
    assert [g.name for g in d.groups] == ["body"] and d.span("body") == (1, 74)
    assert "'tops'" in str(w[0].message) and "'shoes'" in str(w[0].message)
    assert d.n_tokens == 1 + 73 + 1 + 2 + 1 + 2 + 1 + 1
    with pytest.warns(TruncationWarning):
        assert d == discretizer().discretize_by_offsets([_long_caption(73)])[0]


def test_short_caption_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = discretize(compose(Annotation.load("data_samples/annotations/fig3_example.json")))
    assert d.lost_groups == () and d.span("body") == (1, 12) and d.span("hair") == (18, 24)


def test_captions_the_cache_cannot_take_go_the_exact_way():
    odd = Caption.from_phrases([("body", "a woman!"), ("hair", "(red) hair")])  # punctuation next to the comma
    dz = discretizer()
    assert not dz._cacheable(odd)
    d = discretize(odd)
    assert list(d.input_ids) == TOK(odd.text, padding="max_length", max_length=77)["input_ids"]
    assert [g.name for g in d.groups] == ["body", "hair"]


def test_other_tokenizers():
    c = compose(Annotation.load("data_samples/annotations/park_sundress.json"))
    tok, tok2 = sdxl_tokenizers()
    a, b = discretize(c, tok), discretize(c, tok2)
    assert a.groups == b.groups
    n = a.n_tokens
    assert a.input_ids[:n] == b.input_ids[:n] and set(b.input_ids[n:]) == {0} and set(a.input_ids[n:]) == {49407}
    assert Discretizer(tok2).word_by_word


def test_bad_input():
    with pytest.raises(TypeError, match="discretize_text"):
        discretize("a woman in a red dress")
    with pytest.raises(TypeError):
        discretize_text(["a woman"])


def test_json_contract():
    d = discretize(compose(Annotation.load("data_samples/annotations/fig3_example.json")))
    j = json.loads(json.dumps(d.to_dict()))
    assert {"caption", "input_ids", "groups"} <= set(j)
    assert len(j["input_ids"]) == 77
    assert j["groups"][0] == {"name": "body", "phrases": ["A full-body shot", "an adult female", "fit"], "span": [1, 12]}
    assert d.spans(["body", "hat", "hair"]) == [(1, 12), (-1, -1), (18, 24)]


# --- free text -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, group, words", [
    ("a man wearing oxford shoes", "shoes", "oxford shoes"),
    ("a girl in a pleated skirt", "bottoms", "pleated skirt"),
    ("a woman with red hair", "hair", "red hair"),
    ("standing by a wooden fence", "other", "wooden fence"),
    ("a woman in a park", "body", "woman"),
    ("a smiling man", "body", "smiling man"),  # an attribute goes with the noun it qualifies
    ("a full-body photo of someone", "body", "full-body"),
    ("brown leather boots", "shoes", "brown leather boots"),
    ("a white and long sleeve cotton shirt", "tops", "white and long sleeve cotton shirt"),
    ("a red shirt dress", "dress", "red shirt dress"),
    ("dark green sneakers", "shoes", "dark green sneakers"),
    ("a backpack", "bag", "backpack"),
])
def test_free_text_lexicon(text, group, words):
    d = discretize_text(text)
    s, e = d.span(group)
    assert squash(TOK.decode(d.input_ids[s:e])) == squash(words)
    assert d.caption == text


def test_free_text_groups_in_text_order_and_repeated():
    d = discretize_text("A woman with red hair, a blue denim jacket and black jeans, her hair in a bun")
    assert [g.name for g in d.groups] == ["body", "hair", "tops", "bottoms", "hair"]
    assert d.groups[4].phrases == ("hair in a bun",)
    assert discretize_text("a photo of a cat").groups == ()
    assert discretize_text("").groups == ()


def test_free_text_truncation():
    text = "a woman, " + "cat " * 80 + ", red shoes"
    with pytest.warns(TruncationWarning, match="shoes"):
        d = discretize_text(text)
    assert d.span("body") == (2, 3) and d.lost_groups == ("shoes",)


def test_free_text_agrees_with_composed_spans(random_captions):
    """On composed captions read as free text, every group found lies inside the true group's span."""
    found = total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        exact = discretize_batch(random_captions[:300])
        free = discretize_text_batch([c.text for c in random_captions[:300]])
    for a, b in zip(exact, free):
        for g in b.groups:
            s = a.span(g.name)
            assert s is not None and s[0] <= g.span[0] < g.span[1] <= s[1], (a.caption, g)
        total += len(a.groups)
        found += sum(1 for g in a.groups if b.span(g.name))
    assert found / total > 0.9  # recall; the misses are phrases with no noun, e.g. a lone colour


@pytest.mark.parametrize("text", [
    "She's wearing 1980s-style (RED) jeans!!, can't  stop; A-line_skirt ok?",
    "a man   in a T-SHIRT... and 3/4 sleeves -- 'quoted' words, it'll rain",
    "tab\tand\nnewline: café, naïve Zürich, 東京",   # not plain ASCII: the tokenizer's own offsets
    "<|startoftext|> a woman <|endoftext|>",
])
def test_free_text_ids_equal_the_tokenizers(text):
    d = discretize_text(text)
    assert list(d.input_ids) == TOK(text, padding="max_length", truncation=True, max_length=77)["input_ids"]
