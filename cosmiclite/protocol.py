"""The label protocol of Annotate Anyone (CosmicMan, CVPR 2024, Sec. 3.2.2 "Label Protocol").

The paper divides each image into the 18 fine parts that the SCHP human parser predicts (the ATR
label set) and asks 3 to 8 questions per part, 70 categories in all ("top-sleeve length", ...).
The answers are what captions are composed from (Sec. 4.2, Fig. 3) and what semantic accuracy
asks about (Sec. 5.1: Acc_obj, Acc_tex, Acc_shape by question kind).

The protocol lives in `assets/protocol.yaml`; this module loads it into plain dataclasses and
validates annotations against it.

But: the paper never lists its 70 questions. The ones here follow Fig. 3 (person type, gender, age,
body shape, background; hair colour/style/length; top type/pattern/colour/material/sleeve/length/
collar; bottoms type/pattern/material/length/shape; bag; shoes ...) and fill the other parts so that
each has 3 to 8, as the paper says. Ethnicity ("Country" in Fig. 3) is left out: skin tone is asked
instead, which is what an image shows.
"""
from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

import yaml
from PIL import Image

ASSETS = Path(__file__).parent / "assets"
PROTOCOL_YAML = ASSETS / "protocol.yaml"

NOT_VISIBLE = "not visible"
NOT_APPLICABLE = "not applicable"
KINDS = ("object", "texture", "shape")
LEVELS = ("body", "outfit", "other")


class AnnotationError(ValueError):
    """An annotation does not fit the protocol. `errors` lists every problem found, one line each."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid annotation:\n  " + "\n  ".join(self.errors))


@dataclass(frozen=True)
class Part:
    """One of the 18 ATR parts; `atr_label` is its value in an ATR parsing map."""
    id: str
    atr_label: int
    name: str


@dataclass(frozen=True)
class Question:
    """One of the 70 categories. `kind` is object/texture/shape (Sec. 5.1); `group` its caption group."""
    id: str
    part: str
    group: str
    kind: str
    text: str
    answers: tuple[str, ...]
    requires: tuple[tuple[str, str], ...] = ()
    phrases: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_global(self) -> bool:
        """Body-level (a C_body attribute of the whole person) rather than tied to one part."""
        return self.group == "body"

    def phrase(self, answer: str) -> str:
        """How `answer` reads in a caption ('' if it adds no words)."""
        return self.phrases.get(answer, answer)

    @property
    def chance(self) -> float:
        """Accuracy of a uniform random guess over the vocabulary."""
        return 1.0 / len(self.answers)


@dataclass(frozen=True)
class Group:
    """A caption group of Sec. 4.2: body (C_body / h_1), an outfit group with a mask, or other (c_other)."""
    name: str
    level: str
    atr_labels: tuple[int, ...]
    phrases: tuple[str, ...]
    wear: str | None = None

    @property
    def has_mask(self) -> bool:
        return self.level != "other"


@dataclass(frozen=True)
class Protocol:
    parts: tuple[Part, ...]
    groups: tuple[Group, ...]
    questions: tuple[Question, ...]
    special_answers: tuple[str, ...] = (NOT_VISIBLE, NOT_APPLICABLE)

    def __post_init__(self):
        object.__setattr__(self, "_q", {q.id: q for q in self.questions})
        object.__setattr__(self, "_g", {g.name: g for g in self.groups})

    # --- lookups ---------------------------------------------------------------------------------
    def question(self, qid: str) -> Question:
        try:
            return self._q[qid]
        except KeyError:
            raise KeyError(f"unknown question {qid!r}; the protocol's questions are: "
                           f"{', '.join(self._q)}") from None

    def group(self, name: str) -> Group:
        try:
            return self._g[name]
        except KeyError:
            raise KeyError(f"unknown caption group {name!r}; groups are: {', '.join(self._g)}") from None

    @property
    def question_ids(self) -> tuple[str, ...]:
        return tuple(self._q)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(self._g)

    def questions_of(self, *, part: str | None = None, group: str | None = None,
                     kind: str | None = None) -> list[Question]:
        return [q for q in self.questions if (part is None or q.part == part)
                and (group is None or q.group == group) and (kind is None or q.kind == kind)]

    def to_dict(self) -> dict:
        """The machine-readable form printed by `cosmiclite protocol --json`."""
        return {
            "parts": [{"id": p.id, "atr_label": p.atr_label, "name": p.name,
                       "questions": [q.id for q in self.questions_of(part=p.id)]} for p in self.parts],
            "groups": [{"name": g.name, "level": g.level, "atr_labels": list(g.atr_labels),
                        "wear": g.wear, "phrases": list(g.phrases)} for g in self.groups],
            "questions": [{"id": q.id, "part": q.part, "group": q.group, "kind": q.kind,
                           "global": q.is_global, "text": q.text, "answers": list(q.answers),
                           "requires": dict(q.requires), "phrases": dict(q.phrases)}
                          for q in self.questions],
            "special_answers": list(self.special_answers),
        }

    # --- validation --------------------------------------------------------------------------------
    def check(self, answers: Mapping[str, object]) -> list[str]:
        """Every problem with `answers` (question id -> answer), one readable line each."""
        errors = []
        if not isinstance(answers, Mapping):
            return [f"answers must be a mapping of question id to answer, got {type(answers).__name__}"]
        for qid, a in answers.items():
            if qid not in self._q:
                errors.append(f"unknown question {qid!r}: not in the protocol "
                              f"(see `cosmiclite protocol` for the 70 question ids)")
                continue
            q = self._q[qid]
            if isinstance(a, str) and (a in q.answers or a in self.special_answers):
                continue  # the common case: no error text to build (keeps validation cheap)
            allowed = ", ".join(repr(x) for x in (*q.answers, *self.special_answers))
            if not isinstance(a, str):
                errors.append(f"question {qid!r}: answer must be a string, got {type(a).__name__} "
                              f"{a!r}; allowed answers: {allowed}")
            elif a not in q.answers and a not in self.special_answers:
                errors.append(f"question {qid!r}: answer {a!r} is not allowed; allowed answers: {allowed}")
        for qid, a in answers.items():
            q = self._q.get(qid)
            if q is None or not isinstance(a, str) or a in self.special_answers:
                continue
            for dep, needed in q.requires:
                if answers.get(dep) != needed:
                    errors.append(f"question {qid!r}: answered {a!r} but it applies only when "
                                  f"{dep!r} is {needed!r} (got {answers.get(dep)!r}); answer "
                                  f"{NOT_APPLICABLE!r} or set {dep!r} to {needed!r}")
        return errors

    def applies(self, q: Question, answers: Mapping[str, str]) -> bool:
        """Whether question `q` applies given the other answers (its `requires` hold)."""
        return all(answers.get(dep) == needed for dep, needed in q.requires)


def _load(data: dict) -> Protocol:
    vocab = data.get("vocabularies", {})

    def answers(q):
        a = q["answers"]
        if isinstance(a, str) and a.startswith("$"):
            a = vocab[a[1:]]
        return tuple(str(x) for x in a)

    parts = tuple(Part(p["id"], int(p["atr_label"]), p["name"]) for p in data["parts"])
    groups = tuple(Group(g["name"], g["level"], tuple(g.get("atr_labels", ())), tuple(g["phrases"]),
                         g.get("wear")) for g in data["groups"])
    questions = tuple(Question(q["id"], q["part"], q["group"], q["kind"], q["text"], answers(q),
                               tuple((k, str(v)) for k, v in q.get("requires", {}).items()),
                               {str(k): str(v) for k, v in q.get("phrases", {}).items()})
                      for q in data["questions"])
    p = Protocol(parts, groups, questions, tuple(data.get("special_answers", (NOT_VISIBLE, NOT_APPLICABLE))))
    _self_check(p)
    return p


def _self_check(p: Protocol) -> None:
    part_ids = {x.id for x in p.parts}
    for q in p.questions:
        assert q.part in part_ids, f"question {q.id}: unknown part {q.part}"
        assert q.kind in KINDS, f"question {q.id}: kind {q.kind} not in {KINDS}"
        p.group(q.group)
        for dep, _ in q.requires:
            p.question(dep)
    for g in p.groups:
        assert g.level in LEVELS, f"group {g.name}: level {g.level} not in {LEVELS}"


@lru_cache(maxsize=None)
def load_protocol(path: str | Path | None = None) -> Protocol:
    """The protocol shipped with the kit (or one loaded from another YAML file of the same shape)."""
    path = Path(path) if path else PROTOCOL_YAML
    return _load(yaml.safe_load(path.read_text()))


@dataclass
class Annotation:
    """One image's answers to the protocol (question id -> answer), validated on creation.

    Questions left out are unanswered; "not visible" and "not applicable" are answers too.
    `image` is the image path relative to the annotation file (or a `pkg:` reference to a file inside
    an installed package, e.g. ``pkg:matplotlib/mpl-data/sample_data/grace_hopper.jpg``).
    """
    answers: dict[str, str]
    image: str | None = None
    source: str | None = None
    protocol: Protocol = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.protocol = self.protocol or load_protocol()
        errors = self.protocol.check(self.answers)
        if errors:
            raise AnnotationError(errors)
        self.answers = {qid: self.answers[qid] for qid in self.protocol.question_ids if qid in self.answers}

    def get(self, qid: str) -> str | None:
        """The answer, or None when unanswered / not visible / not applicable."""
        self.protocol.question(qid)
        a = self.answers.get(qid)
        return None if a in self.protocol.special_answers else a

    def to_dict(self) -> dict:
        d = {"answers": dict(self.answers)}
        if self.image is not None:
            d["image"] = self.image
        if self.source is not None:
            d["source"] = self.source
        return d

    @classmethod
    def from_dict(cls, d: Mapping, protocol: Protocol | None = None) -> "Annotation":
        if not isinstance(d, Mapping) or "answers" not in d:
            raise AnnotationError(["an annotation must be a JSON object with an 'answers' field "
                                   "(question id -> answer), e.g. {\"answers\": {\"hair_color\": \"red\"}}"])
        extra = set(d) - {"answers", "image", "source"}
        if extra:
            raise AnnotationError([f"unknown field(s) {sorted(extra)} in the annotation; allowed fields: "
                                   "'answers', 'image', 'source'"])
        return cls(dict(d["answers"]) if isinstance(d["answers"], Mapping) else d["answers"],
                   d.get("image"), d.get("source"), protocol)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, protocol: Protocol | None = None) -> "Annotation":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {str(path)!r} does not exist; pass the path of a "
                                    "JSON file such as data_samples/annotations/grace_hopper.json")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise AnnotationError([f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"]) from None
        return cls.from_dict(d, protocol)


def questions_by_kind(protocol: Protocol, ids: Iterable[str]) -> dict[str, list[str]]:
    """Split question ids into the paper's object/texture/shape families (Sec. 5.1)."""
    out: dict[str, list[str]] = {k: [] for k in KINDS}
    for qid in ids:
        out[protocol.question(qid).kind].append(qid)
    return out


def resolve_image(ref: str, base_dir: str | Path | None = None) -> Path:
    """The file an annotation's `image` names: a path relative to `base_dir` (the annotation's folder),
    or ``pkg:PACKAGE/path/inside`` for a file shipped inside an installed package.

    Why `pkg:`: a real photograph can then be annotated without copying it into the kit (and its
    licence along with it); e.g. ``pkg:matplotlib/mpl-data/sample_data/grace_hopper.jpg``.
    """
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"image reference must be a non-empty string, got {ref!r}; use a path relative to "
                         "the annotation file or 'pkg:PACKAGE/path/inside/it'")
    if ref.startswith("pkg:"):
        package, _, inner = ref[4:].partition("/")
        if not package or not inner:
            raise ValueError(f"image reference {ref!r}: write it as 'pkg:PACKAGE/path/inside/it', e.g. "
                             "'pkg:matplotlib/mpl-data/sample_data/grace_hopper.jpg'")
        try:
            path = Path(str(importlib.resources.files(package).joinpath(inner)))
        except ModuleNotFoundError:
            raise FileNotFoundError(f"image reference {ref!r}: package {package!r} is not installed; "
                                    f"install it (pip install {package}) or point 'image' at a file") from None
    else:
        path = Path(base_dir or ".") / ref
    if not path.is_file():
        raise FileNotFoundError(f"image {ref!r} not found (looked at {str(path)!r}); fix the annotation's "
                                "'image' field or pass base_dir= the folder of the annotation file")
    return path


def load_image(annotation: Annotation, base_dir: str | Path | None = None):
    """The annotated photo as an RGB PIL image (see `resolve_image` for how `annotation.image` is found)."""
    if annotation.image is None:
        raise ValueError("this annotation has no 'image' field; set Annotation.image to a path relative to "
                         "the annotation file or to 'pkg:PACKAGE/path/inside/it'")
    with Image.open(resolve_image(annotation.image, base_dir)) as im:
        return im.convert("RGB")
