"""Captions composed from protocol answers (CosmicMan, CVPR 2024, Sec. 4.2 and Fig. 3).

CosmicMan-HQ's captions are not free prose: they are written from the Annotate Anyone labels, part by
part, so that every phrase is known to belong to one group of the discretized prototype

    C = {C_body, C_outfit},   C_outfit = {c_2 ... c_N, c_other}

(C_body: global attributes of the whole person, mask h_1; c_i: one outfit part with its mask h_i;
c_other: phrases with no mask, such as the background). Fig. 3 shows the result:

    "A full-body shot, an Asian adult female, fit, small road with trees, straight red above-chest
     hair, normal-length, white and long sleeve cotton shirt, short plaid skirt in pleated shape, ..."

Here each group of `protocol.yaml` carries phrase templates ("{hair_style} {hair_color} {hair_length}
hair"); `compose` fills them from an `Annotation`, keeps each phrase's group and character offsets, and
joins the phrases with ", " — a boundary the CLIP tokenizer never merges across, which is what lets
`discretize` count each group's token span exactly.

But: the paper does not publish its caption templates or its group order; ours follow Fig. 3 (shot,
body, background, then hair, face, clothes top to bottom, accessories). Ethnicity is not asked (see
`protocol.py`), so "Asian" never appears.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

from .protocol import Annotation, Protocol, load_protocol

SEP = ", "   # between phrases; a CLIP token boundary (the comma is a pre-token of its own)
END = "."    # after the last phrase
_SLOT = re.compile(r"\{([a-z_]+)(?:\|([^}]*))?\}")
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Phrase:
    """One phrase of a caption: its text (exactly `caption.text[start:end]`) and its caption group."""
    text: str
    group: str
    start: int
    end: int


@dataclass(frozen=True)
class Caption:
    """A composed caption: `text` and its `phrases` in order, each tagged with its group (Sec. 4.2)."""
    text: str
    phrases: tuple[Phrase, ...]

    @classmethod
    def from_phrases(cls, pieces: Iterable[tuple[str, str]]) -> "Caption":
        """Join (group, phrase) pairs the way every composed caption is joined.

        ", " between phrases, the first letter capitalised, a "." at the end; offsets are recorded as the
        text is built, so `text[p.start:p.end] == p.text` always holds.
        """
        text, phrases = "", []
        for group, words in pieces:
            if not words:
                continue
            if text:
                text += SEP
            else:
                words = words[0].upper() + words[1:]
            phrases.append(Phrase(words, group, len(text), len(text) + len(words)))
            text += words
        return cls(text + END if text else "", tuple(phrases))

    @property
    def groups(self) -> tuple[str, ...]:
        """The caption's groups in order of first appearance."""
        return tuple(dict.fromkeys(p.group for p in self.phrases))

    def phrases_of(self, group: str) -> tuple[str, ...]:
        return tuple(p.text for p in self.phrases if p.group == group)

    def to_dict(self) -> dict:
        return {"caption": self.text,
                "phrases": [{"text": p.text, "group": p.group, "start": p.start, "end": p.end}
                            for p in self.phrases]}

    def __str__(self) -> str:
        return self.text


@lru_cache(maxsize=None)
def _parse(template: str) -> tuple[tuple[str, str | None, str], ...]:
    """A template as (literal text, slot question id or None, slot fallback) pieces, parsed once."""
    pieces, pos = [], 0
    for m in _SLOT.finditer(template):
        pieces.append((template[pos:m.start()], m.group(1), m.group(2) or ""))
        pos = m.end()
    pieces.append((template[pos:], None, ""))
    return tuple(pieces)


def fill(template: str, answers: Mapping[str, str | None], protocol: Protocol, force: bool = False) -> str:
    """One phrase from one template, or '' when none of its slots is answered (see protocol.yaml).

    `answers` maps question id -> answer, None for unanswered / not visible / not applicable. A slot
    "answered" with a word-less answer (e.g. bangs: "no bangs" -> "") counts as unanswered.
    `force` writes the phrase from its fallbacks even then (a worn item with no details: "hat").
    """
    answered, out = force, []
    for literal, qid, fallback in _parse(template):
        out.append(literal)
        if qid is None:
            continue
        a = answers.get(qid)
        words = protocol.question(qid).phrase(a) if a is not None else ""
        answered = answered or bool(words)
        out.append(words or fallback)
    if not answered:
        return ""
    words = "".join(out).split()  # unanswered slots vanish, and with them their spaces
    for i in range(len(words) - 1):  # the article agrees with whatever word now follows it
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][0].lower() in _VOWELS else "a"
    return " ".join(words)


def _given(annotation: Annotation) -> dict[str, str]:
    """Question id -> answer for the answers that say something (not unanswered or special)."""
    special = annotation.protocol.special_answers
    return {q: a for q, a in annotation.answers.items() if a not in special}


def group_phrases(annotation: Annotation, group: str, protocol: Protocol | None = None,
                  _answers: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The phrases one group contributes (Sec. 4.2: sub-caption c_i of semantic map h_i)."""
    protocol = protocol or annotation.protocol
    answers = _given(annotation) if _answers is None else _answers
    g = protocol.group(group)
    if g.wear is not None and answers.get(g.wear) != "yes":
        return ()  # nothing worn: the group (and its mask) is absent from this image
    # A worn item is named even with no details: its first phrase falls back to the bare noun ("hat").
    return tuple(p for i, t in enumerate(g.phrases)
                 if (p := fill(t, answers, protocol, force=g.wear is not None and i == 0)))


def compose(annotation: Annotation | Mapping[str, str], protocol: Protocol | None = None,
            group_order: Sequence[str] | None = None, drop: Iterable[str] = ()) -> Caption:
    """The caption of an annotation, Fig. 3 style: group by group, each phrase tagged with its group.

    Deterministic: the same answers always give the same text. `group_order` (group names; groups it
    leaves out follow in protocol order) and `drop` (group names to leave out) exist for caption
    augmentation in training, e.g. body first, the rest shuffled, a few dropped.
    """
    if not isinstance(annotation, Annotation):
        annotation = Annotation(dict(annotation), protocol=protocol)
    protocol = protocol or annotation.protocol
    names = protocol.group_names
    order = list(group_order or ())
    drop = set(drop)
    for name in (*order, *drop):
        if name not in names:
            raise ValueError(f"unknown caption group {name!r} in group_order/drop; groups are: {', '.join(names)}")
    if len(set(order)) != len(order):
        raise ValueError(f"group_order names a group twice: {order}")
    order += [n for n in names if n not in order]
    answers = _given(annotation)
    return Caption.from_phrases((name, p) for name in order if name not in drop
                                for p in group_phrases(annotation, name, protocol, answers))


# How often each "wear_*" question is "yes" in `random_annotation`: most people wear a top, bottoms and
# shoes, few wear a hat, a belt or a scarf. (A guess for realistic caption lengths, not a statistic.)
WEAR_RATES = {"wear_top": 0.85, "wear_bottoms": 0.75, "wear_shoes": 0.8, "wear_dress": 0.2,
              "wear_hat": 0.15, "wear_eyewear": 0.15, "wear_belt": 0.1, "wear_bag": 0.25, "wear_scarf": 0.1}


def random_annotation(rng: random.Random | int | None = None, protocol: Protocol | None = None,
                      p_unanswered: float = 0.35, p_special: float = 0.05,
                      p_wear: float | Mapping[str, float] = WEAR_RATES) -> Annotation:
    """A valid random annotation: every question answered uniformly from its vocabulary.

    For tests and benchmarks (captions of every shape and length), not a model of real people: some
    questions are left unanswered (`p_unanswered`), some answered "not visible" (`p_special`), each
    "wear_*" question is "yes" with probability `p_wear` (one number, or one per question as in
    WEAR_RATES; 0.5 for those it leaves out), and a question whose `requires` fails is answered
    "not applicable". The defaults give captions of about 50 CLIP tokens.
    """
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    protocol = protocol or load_protocol()
    answers: dict[str, str] = {}
    pending = list(protocol.questions)
    while pending:  # a question is drawn once the questions it depends on have been drawn
        later = []
        for q in pending:
            deps = [dep for dep, _ in q.requires]
            if any(dep in (x.id for x in pending) and dep not in answers for dep in deps):
                later.append(q)
                continue
            r = rng.random()
            if not protocol.applies(q, answers):
                answers[q.id] = "not applicable"
            elif r < p_unanswered:
                continue
            elif r < p_unanswered + p_special:
                answers[q.id] = "not visible"
            elif q.id.startswith("wear_") and set(q.answers) == {"yes", "no"}:
                p = p_wear.get(q.id, 0.5) if isinstance(p_wear, Mapping) else p_wear
                answers[q.id] = "yes" if rng.random() < p else "no"
            else:
                answers[q.id] = rng.choice(q.answers)
        if len(later) == len(pending):
            raise ValueError(f"circular 'requires' among questions {[q.id for q in later]}")
        pending = later
    return Annotation(answers, protocol=protocol)
