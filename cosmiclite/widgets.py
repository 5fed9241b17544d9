"""The attribute editor: the label protocol as a form, its caption and token spans live (CosmicMan Sec. 3.2.2, 4.2).

Annotate Anyone asks 3 to 8 questions per human part (Sec. 3.2.2); Sec. 4.2 turns the answers into one
dense caption (Fig. 3) and cuts it into groups C = {C_body, c_2 .. c_N, c_other}, each with its token span
(s_i, e_i) in the text encoder's 77 tokens; HOLA (Eq. 3) later pulls the cross-attention of exactly those
tokens onto the group's mask. This module lets you *see* that chain while you edit it:

    one Dropdown per protocol question, grouped by part  ->  Annotation (validated)
        ->  captions.compose  ->  discretize.discretize  ->  HTML: the caption with each group's phrases
            coloured, a legend, and a table of groups with their spans and tokens.

The HTML is also available without widgets (`caption_html`) so notebooks can show any caption or
free-text discretization the same way. Elements carry stable CSS classes and `data-group` attributes
(`cosmiclite-caption`, `cosmiclite-phrase`, `cosmiclite-groups`, `cosmiclite-token`, `cosmiclite-errors`)
so a browser test can read them.

But: the editor does not fix invalid combinations for you (e.g. a hat type while "wear a hat?" is "no"):
it shows the protocol's own error lines, because learning what makes an annotation valid is the point.
"""
from __future__ import annotations

import html
import warnings
from typing import Mapping

import ipywidgets as w

from .captions import compose
from .discretize import discretize
from .protocol import Annotation, AnnotationError, Protocol, load_protocol
from .tokenizer import clip_tokenizer

UNANSWERED = "(unanswered)"

_CSS = """<style>
.cosmiclite-view {font-family: sans-serif; font-size: 13px; line-height: 1.7;}
.cosmiclite-caption {font-size: 15px; padding: 6px 8px; border: 1px solid #ccc; border-radius: 4px; margin: 4px 0;}
.cosmiclite-phrase, .cosmiclite-token, .cosmiclite-legend-item {border-radius: 3px; padding: 1px 3px; color: #111;}
.cosmiclite-legend-item {margin-right: 4px; display: inline-block;}
.cosmiclite-tokens {font-family: monospace; font-size: 12px; margin: 4px 0;}
.cosmiclite-token {display: inline-block; margin: 1px; border: 1px solid #ddd;}
.cosmiclite-groups {border-collapse: collapse; margin-top: 4px;}
.cosmiclite-groups td, .cosmiclite-groups th {border: 1px solid #ddd; padding: 2px 6px; text-align: left;}
.cosmiclite-errors, .cosmiclite-warning {color: #a00; background: #fff0f0; border: 1px solid #e99;
  border-radius: 4px; padding: 4px 8px 4px 24px; margin: 4px 0;}
.cosmiclite-warning {color: #850; background: #fff8e0; border-color: #db6;}
</style>"""


def group_colors(protocol: Protocol | None = None) -> dict[str, str]:
    """One light background colour per caption group, stable across runs (protocol order).

    Why golden-angle hues: neighbouring groups in the caption (hair, face, eyewear ...) get far-apart
    hues, and the light tone keeps black text readable on every one of them.
    """
    protocol = protocol or load_protocol()
    return {g.name: f"hsl({(i * 137.508) % 360:.0f}, 75%, 82%)" for i, g in enumerate(protocol.groups)}


def _span(cls: str, group: str | None, text: str, colors: Mapping[str, str], **attrs) -> str:
    style = f' style="background-color: {colors[group]}"' if group in colors else ""
    extra = "".join(f' data-{k}="{html.escape(str(v))}"' for k, v in attrs.items())
    data_group = f' data-group="{html.escape(group)}"' if group else ""
    return f'<span class="{cls}"{data_group}{extra}{style}>{html.escape(text)}</span>'


def _display_token(token: str) -> str:
    """CLIP's BPE token as a reader sees it: "</w>" (end of word) dropped, "…" where the word goes on."""
    if token == "<|startoftext|>":
        return "<start>"
    if token == "<|endoftext|>":
        return "<end>"
    return token[:-4] if token.endswith("</w>") else token + "…"  # "…": the word continues in the next token


def errors_html(errors: list[str], title: str = "This annotation does not fit the protocol:") -> str:
    """Readable error lines (e.g. AnnotationError.errors) as an HTML list, instead of a traceback."""
    items = "".join(f"<li>{html.escape(e)}</li>" for e in errors)
    return (f'<div class="cosmiclite-view">{_CSS}<div class="cosmiclite-errors"><b>{html.escape(title)}</b>'
            f"<ul>{items}</ul></div></div>")


def caption_html(discretized, protocol: Protocol | None = None, tokenizer=None) -> str:
    """A `discretize.Discretized` (composed or free text) as HTML: Sec. 4.2 drawn in Fig. 3's colours.

    Shows: the caption with each group's run of words coloured; a legend; the token sequence up to the
    end token with each token coloured by the group whose span [s_i, e_i) holds it; a table of groups with
    level (body / outfit / other), span, phrases, tokens and ids; and what truncation at 77 tokens lost.
    Pass the tokenizer the caption was discretized with (None = the built-in CLIP tokenizer).
    """
    protocol = protocol or load_protocol()
    tokenizer = tokenizer or clip_tokenizer()
    colors = group_colors(protocol)
    text = str(discretized.caption)
    ids = [int(i) for i in discretized.input_ids]
    groups = list(discretized.groups)
    max_len = len(ids)

    # Character offsets of every token, untruncated, so that a span [s, e) maps back to words:
    # group i's words run from the first character of token s to the last of token e - 1.
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    runs = sorted((offsets[g.span[0]][0], offsets[g.span[1] - 1][1], g.name) for g in groups
                  if g.span[1] > g.span[0] and g.span[1] <= len(offsets))
    cut = offsets[max_len - 1][0] if len(offsets) > max_len else len(text)  # the end token takes the last place
    parts, pos = [], 0
    for a, b, name in runs:
        parts.append(html.escape(text[pos:a]))
        parts.append(_span("cosmiclite-phrase", name, text[a:b], colors))
        pos = b
    parts.append(html.escape(text[pos:cut]))
    if cut < len(text):
        parts.append(f'<span class="cosmiclite-truncated" title="cut by truncation" '
                     f'style="color: #999; text-decoration: line-through">{html.escape(text[cut:])}</span>')
    caption_div = f'<div class="cosmiclite-caption">{"".join(parts)}</div>'

    lost = list(getattr(discretized, "lost_groups", ()) or ())
    legend = "".join(_span("cosmiclite-legend-item", n, n, colors) for n in dict.fromkeys(g.name for g in groups))
    legend_div = f'<div class="cosmiclite-legend">groups: {legend}</div>' if groups else ""

    owner = {}
    for g in groups:
        owner.update({j: g.name for j in range(*g.span)})
    eos = tokenizer.eos_token_id
    n_real = next((j + 1 for j in range(1, len(ids)) if ids[j] == eos), len(ids))
    tokens = tokenizer.convert_ids_to_tokens(ids[:n_real])
    tok_spans = "".join(_span("cosmiclite-token", owner.get(j), _display_token(t), colors, index=j, id=ids[j])
                        for j, t in enumerate(tokens))
    tokens_div = (f'<div class="cosmiclite-tokens" title="token positions 0..{n_real - 1} of {max_len}">'
                  f"{tok_spans}</div>")

    rows = []
    for g in groups:
        s, e = g.span
        level = protocol.group(g.name).level if g.name in protocol.group_names else "?"
        toks = " ".join(_span("cosmiclite-token", g.name, _display_token(t), colors)
                        for t in tokenizer.convert_ids_to_tokens(ids[s:e]))
        rows.append(f'<tr data-group="{html.escape(g.name)}">'
                    f"<td>{_span('cosmiclite-legend-item', g.name, g.name, colors)}</td><td>{level}</td>"
                    f'<td class="cosmiclite-span" data-start="{s}" data-end="{e}">[{s}, {e})</td>'
                    f"<td>{html.escape(' | '.join(g.phrases))}</td><td>{toks}</td>"
                    f"<td><code>{' '.join(map(str, ids[s:e]))}</code></td></tr>")
    table = ('<table class="cosmiclite-groups"><tr><th>group</th><th>level</th><th>span [s, e)</th>'
             f'<th>phrases</th><th>tokens</th><th>ids</th></tr>{"".join(rows)}</table>')
    lost_div = ""
    if lost:
        names = ", ".join(lost)
        lost_div = (f'<div class="cosmiclite-warning" data-lost="{html.escape(names)}">The caption is '
                    f"{len(offsets)} tokens, longer than the text encoder's {max_len}: truncation cut the "
                    f"group(s) {html.escape(names)}, which get no span (drop or reorder groups to keep them)."
                    "</div>")
    return f'<div class="cosmiclite-view">{_CSS}{caption_div}{legend_div}{tokens_div}{lost_div}{table}</div>'


class AttributeEditor:
    """A form over the label protocol that re-captions and re-discretizes on every change.

    ``AttributeEditor(annotation=None)``; show ``editor.widget`` in a notebook. Drive it from code with
    ``editor.set("hair_color", "red")`` or ``editor.annotation = Annotation(...)``; read back
    ``editor.annotation`` (None while invalid), ``editor.errors``, ``editor.caption``, ``editor.discretized``
    and ``editor.html`` (what the page shows).
    """

    def __init__(self, annotation: Annotation | None = None, *, protocol: Protocol | None = None,
                 tokenizer=None):
        self.protocol = protocol or (annotation.protocol if annotation is not None else load_protocol())
        self.tokenizer = tokenizer
        self._annotation: Annotation | None = None
        self._caption = self._discretized = None
        self._errors: list[str] = []
        self._muted = False
        self._image = self._source = None  # carried over from a loaded annotation to the edited one

        specials = list(self.protocol.special_answers)
        self.dropdowns: dict[str, w.Dropdown] = {}
        pages, titles = [], []
        for part in self.protocol.parts:
            qs = self.protocol.questions_of(part=part.id)
            if not qs:
                continue
            boxes = []
            for q in qs:
                dd = w.Dropdown(options=[UNANSWERED, *q.answers, *specials], value=UNANSWERED,
                                description=q.id, tooltip=q.text,
                                style={"description_width": "130px"}, layout=w.Layout(width="380px"))
                dd.add_class("cosmiclite-question")
                dd.add_class(f"cosmiclite-q-{q.id}")
                dd.observe(self._on_change, names="value")
                self.dropdowns[q.id] = dd
                boxes.append(dd)
            pages.append(w.VBox(boxes))
            titles.append(f"{part.name} · {len(qs)} questions")
        self.parts = w.Accordion(children=pages, titles=tuple(titles))
        self.parts.add_class("cosmiclite-parts")
        self.view = w.HTML()
        self.view.add_class("cosmiclite-editor-view")
        self.widget = w.VBox([self.view, self.parts])
        self.widget.add_class("cosmiclite-editor")
        if annotation is not None:
            self.annotation = annotation
        else:
            self._update()

    # --- reading and writing the answers -----------------------------------------------------------
    @property
    def answers(self) -> dict[str, str]:
        """The form's answers (question id -> answer), unanswered questions left out."""
        return {qid: dd.value for qid, dd in self.dropdowns.items() if dd.value != UNANSWERED}

    @property
    def annotation(self) -> Annotation | None:
        """The current Annotation, or None while the answers do not fit the protocol (see `errors`)."""
        return self._annotation

    @annotation.setter
    def annotation(self, annotation: Annotation) -> None:
        if not isinstance(annotation, Annotation):
            raise TypeError(f"annotation must be a cosmiclite Annotation, got {type(annotation).__name__}; "
                            "load one with Annotation.load(path)")
        self._image, self._source = annotation.image, annotation.source
        self._muted = True  # set all 70 dropdowns, then recompute once
        try:
            for qid, dd in self.dropdowns.items():
                dd.value = annotation.answers.get(qid, UNANSWERED)
        finally:
            self._muted = False
        self._update()

    def set(self, qid: str, answer: str | None) -> None:
        """Answer one question as if picked in its dropdown (None = unanswered)."""
        self.protocol.question(qid)  # a clear KeyError for an unknown id
        dd = self.dropdowns[qid]
        value = UNANSWERED if answer is None else answer
        if value not in dd.options:
            allowed = ", ".join(repr(o) for o in dd.options if o != UNANSWERED)
            raise ValueError(f"question {qid!r}: answer {answer!r} is not allowed; allowed answers: {allowed}")
        dd.value = value

    @property
    def errors(self) -> list[str]:
        return list(self._errors)

    @property
    def caption(self):
        """The composed `captions.Caption`, or None while the annotation is invalid."""
        return self._caption

    @property
    def discretized(self):
        """The `discretize.Discretized` of the caption, or None while the annotation is invalid."""
        return self._discretized

    @property
    def html(self) -> str:
        return self.view.value

    # --- the live chain: answers -> Annotation -> Caption -> Discretized -> HTML ------------------
    def _on_change(self, change) -> None:
        if not self._muted:
            self._update()

    def _update(self) -> None:
        self._annotation = self._caption = self._discretized = None
        try:
            self._annotation = Annotation(self.answers, self._image, self._source, protocol=self.protocol)
        except AnnotationError as e:
            self._errors = e.errors
            self.view.value = errors_html(e.errors)
            return
        self._errors = []
        with warnings.catch_warnings():
            # Truncation is reported by discretize as a warning *and* in `lost_groups`; the page shows
            # the latter, so the warning is not printed again into the notebook on every edit.
            warnings.simplefilter("ignore")
            try:
                self._caption = compose(self._annotation, protocol=self.protocol)
                self._discretized = discretize(self._caption, tokenizer=self.tokenizer)
            except ValueError as e:  # shown on the page, not as a traceback under the cell
                self._caption = self._discretized = None
                self._errors = [str(e)]
                self.view.value = errors_html(self._errors, title="These answers could not be captioned:")
                return
        self.view.value = caption_html(self._discretized, self.protocol, self.tokenizer)

    def _repr_mimebundle_(self, **kwargs):
        # So that a bare `editor` as the last line of a cell shows the form.
        return self.widget._repr_mimebundle_(**kwargs)
