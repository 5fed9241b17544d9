"""The attribute editor (widgets.py) and the coloured caption view, driven from code; plus load_image."""
from __future__ import annotations

import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cosmiclite.captions import compose, random_annotation
from cosmiclite.discretize import discretize, discretize_text
from cosmiclite.protocol import Annotation, load_image, load_protocol, resolve_image
from cosmiclite.widgets import UNANSWERED, AttributeEditor, caption_html, group_colors

pytest.importorskip("ipywidgets")

ROOT = Path(__file__).resolve().parents[1]
GRACE = ROOT / "data_samples" / "annotations" / "grace_hopper.json"


class Spans(HTMLParser):
    """Collects (class, data-group, text, style) of every <span> in an HTML string (spans do not nest here)."""

    def __init__(self, markup: str):
        super().__init__()
        self.spans, self._open = [], None
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            a = dict(attrs)
            self._open = [a.get("class"), a.get("data-group"), "", a.get("style", "")]

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(tuple(self._open))
            self._open = None

    def of(self, cls, group=None):
        return [s for s in self.spans if s[0] == cls and (group is None or s[1] == group)]


@pytest.fixture(scope="module")
def grace():
    return Annotation.load(GRACE)


def test_form_follows_the_protocol(grace):
    p = load_protocol()
    ed = AttributeEditor(grace)
    assert list(ed.dropdowns) == list(p.question_ids)
    for q in p.questions:
        assert ed.dropdowns[q.id].options == (UNANSWERED, *q.answers, *p.special_answers)
    # one accordion page per part, each holding exactly that part's questions
    assert len(ed.parts.children) == len(p.parts) == 18
    for page, part in zip(ed.parts.children, p.parts):
        assert [d.description for d in page.children] == [q.id for q in p.questions_of(part=part.id)]
    assert ed.parts.titles[2].startswith("Hair")


def test_editor_shows_the_annotation_caption_and_spans(grace):
    ed = AttributeEditor(grace)
    assert ed.answers == grace.answers and ed.annotation == grace and ed.errors == []
    assert ed.caption.text == compose(grace).text
    d = discretize(ed.caption)
    assert [(g.name, g.span) for g in ed.discretized.groups] == [(g.name, g.span) for g in d.groups]
    page = Spans(ed.html)
    colors = group_colors()
    for g in d.groups:
        (phrase,) = page.of("cosmiclite-phrase", g.name)  # each group one coloured run in the caption
        assert phrase[2] == ", ".join(g.phrases)
        assert colors[g.name] in phrase[3]
        toks = page.of("cosmiclite-token", g.name)
        assert len(toks) == 2 * (g.span[1] - g.span[0])  # once in the token row, once in the table
    assert f'data-start="{d.span("hair")[0]}"' in ed.html


def test_editing_a_dropdown_recaptions(grace):
    ed = AttributeEditor(grace)
    before = ed.caption.text
    ed.dropdowns["hair_color"].value = "red"  # as if picked in the browser
    assert ed.caption.text == before.replace("wavy grey short hair", "wavy red short hair")
    (hair,) = Spans(ed.html).of("cosmiclite-phrase", "hair")
    assert hair[2] == "wavy red short hair"
    ed.set("hair_color", None)
    assert "hair_color" not in ed.answers and "grey" not in Spans(ed.html).of("cosmiclite-phrase", "hair")[0][2]


def test_invalid_combination_is_shown_not_raised(grace):
    ed = AttributeEditor(grace)
    ed.set("wear_hat", "no")  # hat_type is still "cap"
    assert ed.annotation is None and ed.caption is None and ed.discretized is None
    assert any("hat_type" in e and "wear_hat" in e for e in ed.errors)
    assert 'class="cosmiclite-errors"' in ed.html and "Traceback" not in ed.html
    assert 'class="cosmiclite-caption"' not in ed.html
    ed.set("hat_type", "not applicable")
    ed.set("hat_color", "not applicable")
    assert ed.errors == [] and "cap" not in ed.caption.text.split(", ")
    assert not Spans(ed.html).of("cosmiclite-phrase", "hat")


def test_setting_an_annotation_and_bad_input(grace):
    ed = AttributeEditor()
    assert ed.answers == {} and ed.caption.text == ""
    ed.annotation = grace
    assert ed.answers == grace.answers
    with pytest.raises(KeyError, match="hair_colour"):
        ed.set("hair_colour", "red")
    with pytest.raises(ValueError, match="allowed answers: 'black'"):
        ed.set("hair_color", "auburn")
    with pytest.raises(TypeError, match="Annotation"):
        ed.annotation = {"hair_color": "red"}


def test_caption_html_free_text_and_truncation():
    free = discretize_text("A young woman with curly red hair in a striped t-shirt, black oxford shoes.")
    page = Spans(caption_html(free))
    assert [s[2] for s in page.of("cosmiclite-phrase", "shoes")] == ["black oxford shoes"]
    assert [s[2] for s in page.of("cosmiclite-phrase", "hair")] == ["curly red hair"]

    long_caption = compose(random_annotation(0, p_unanswered=0.0, p_special=0.0, p_wear=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = discretize(long_caption)
    assert d.lost_groups
    markup = caption_html(d)
    page = Spans(markup)
    assert f'data-lost="{", ".join(d.lost_groups)}"' in markup
    for lost in d.lost_groups:  # no coloured run or token for a group truncation cut
        assert not page.of("cosmiclite-phrase", lost) and not page.of("cosmiclite-token", lost)
    (cut,) = page.of("cosmiclite-truncated")
    assert long_caption.text.endswith(cut[2])
    assert len(page.of("cosmiclite-token")) - sum(2 * (g.span[1] - g.span[0]) for g in d.groups) \
        <= 77  # the token row never shows more than the 77 positions the encoder sees


def test_group_colors_are_distinct():
    colors = group_colors()
    assert list(colors) == list(load_protocol().group_names)
    assert len(set(colors.values())) == len(colors)


# --- protocol.load_image -------------------------------------------------------------------------------
def test_grace_hopper_photo_is_loaded_from_matplotlib(grace):
    import matplotlib
    import numpy as np

    assert grace.image == "pkg:matplotlib/mpl-data/sample_data/grace_hopper.jpg"
    path = resolve_image(grace.image)
    assert path.is_file() and Path(matplotlib.get_data_path()) in path.parents
    img = load_image(grace)
    assert img.mode == "RGB" and img.size == (512, 600) and np.asarray(img).std() > 20  # a real photo
    assert not (ROOT / "data_samples" / "grace_hopper.jpg").exists()  # referenced, not copied


def test_load_image_relative_and_errors(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 3), (255, 0, 0)).save(tmp_path / "red.png")
    a = Annotation({"hair_color": "red"}, image="red.png")
    assert load_image(a, base_dir=tmp_path).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(FileNotFoundError, match="red.png"):
        load_image(a, base_dir=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="no 'image' field"):
        load_image(Annotation({}))
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_xyz' is not installed"):
        load_image(Annotation({}, image="pkg:no_such_pkg_xyz/a.jpg"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(Annotation({}, image="pkg:matplotlib/mpl-data/sample_data/nope.jpg"))
    with pytest.raises(ValueError, match="pkg:PACKAGE/path"):
        load_image(Annotation({}, image="pkg:matplotlib"))
