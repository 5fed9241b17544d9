"""Semantic accuracy (CosmicMan, CVPR 2024, Sec. 5.1; inspired by DSG, Cho et al. 2024).

The paper measures fine-grained text-image alignment by asking questions about each generated image
and checking the answers against the prompt's annotation: Acc_obj, Acc_tex and Acc_shape over the
object, texture and shape questions, and Acc_all overall. Here the questions are the protocol's
(`protocol.py`, each with its `kind`), the prompt is an `Annotation`, and the one answering is a
`Judge` (`judge.py`): a small CNN for the toy world, a VQA model for real images.

For each image we ask every question its annotation answers with a real value, skipping
  - unanswered questions and the special answers "not visible" / "not applicable" (nothing to check),
  - questions the judge cannot answer (counted in `not_judged`, so a narrow judge is never mistaken
    for a good generator).

Acc_kind = correct / asked over all (image, question) pairs of that kind (pooled, so a question asked
more often weighs more). Acc_all = the mean of the three kinds: that is what the paper's tables
report — in all eleven rows of Tables 2 and 4, Acc_all equals (Acc_obj + Acc_tex + Acc_shape) / 3 to
within rounding (e.g. SD 1.5: (87.3 + 77.4 + 59.3) / 3 = 74.67, reported 74.6). The pooled figure over
every asked pair is given too (`acc_pooled`).

Dependencies, as DSG does them: a question that `requires` a parent answer (top colour requires
"wear_top = yes") is counted wrong when the judge's own answer to the parent contradicts it — if the
judge sees no top, the image cannot show the asked top colour. `parents="independent"` turns this off.

Chance levels, beside every question, to read an accuracy against:
  - `chance_uniform` = 1 / len(answers): a uniform guess over the question's vocabulary;
  - `chance_majority` = the share of the most common reference answer among the images where the
    question was asked: what a judge that always says that answer would score on *this* evaluation
    set. This is the honest floor when the evaluation distribution is skewed (e.g. 90 % "no hat").

But: the paper does not publish its question list, its VQA model, nor how it averages; DSG's
per-image score (mean over an image's questions) is given as `per_image` but is not what Acc_kind uses.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .alignment import Alignment, attention_alignment  # noqa: F401  (where attention goes; kept importable here)
from .protocol import KINDS, Annotation, Protocol, load_protocol

PARENT_RULES = ("dsg", "independent")
ACC_NAMES = {"object": "Acc_obj", "texture": "Acc_tex", "shape": "Acc_shape"}


@dataclass(frozen=True)
class QuestionScore:
    """One question's row of the per-question breakdown."""
    id: str
    kind: str
    group: str
    asked: int                 # images whose annotation answers it (and the judge can answer it)
    correct: int
    chance_uniform: float      # 1 / len(answers)
    chance_majority: float     # share of the most common reference answer among the asked images
    majority_answer: str | None
    parent_failures: int = 0   # wrong only because the judge contradicted a parent question (DSG rule)

    @property
    def accuracy(self) -> float:
        return self.correct / self.asked if self.asked else float("nan")

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "group": self.group, "asked": self.asked,
                "correct": self.correct, "accuracy": self.accuracy,
                "chance_uniform": self.chance_uniform, "chance_majority": self.chance_majority,
                "majority_answer": self.majority_answer, "parent_failures": self.parent_failures}


@dataclass
class SemanticAccuracy:
    """The result of `semantic_accuracy`: Acc_obj/tex/shape/all, the breakdown and what was skipped."""
    acc_obj: float
    acc_tex: float
    acc_shape: float
    acc_all: float                       # mean of the three kinds, as the paper's tables
    acc_pooled: float                    # correct / asked over every (image, question) pair
    n_images: int
    asked: dict[str, int]                # per kind
    correct: dict[str, int]              # per kind
    questions: list[QuestionScore]       # asked at least once, protocol order
    per_image: list[float]               # DSG-style: each image's mean over its asked questions
    not_judged: dict[str, int] = field(default_factory=dict)  # answered by annotations, not by the judge
    parents: str = "dsg"

    @property
    def by_kind(self) -> dict[str, float]:
        return {"object": self.acc_obj, "texture": self.acc_tex, "shape": self.acc_shape}

    @property
    def chance(self) -> dict[str, float]:
        """What uniform guessing would score, weighted as the accuracies are: per kind the asked-weighted mean
        of 1/|answers| ("object", "texture", "shape"), and "all" their mean (as Acc_all)."""
        out = {}
        for k in KINDS:
            qs = [q for q in self.questions if q.kind == k]
            n = sum(q.asked for q in qs)
            out[k] = sum(q.chance_uniform * q.asked for q in qs) / n if n else float("nan")
        out["all"] = sum(out[k] for k in KINDS) / len(KINDS)
        return out

    def question(self, qid: str) -> QuestionScore:
        for q in self.questions:
            if q.id == qid:
                return q
        raise KeyError(f"question {qid!r} was never asked in this evaluation; asked: "
                       f"{', '.join(q.id for q in self.questions)}")

    def to_dict(self) -> dict:
        return {"acc_obj": self.acc_obj, "acc_tex": self.acc_tex, "acc_shape": self.acc_shape,
                "acc_all": self.acc_all, "acc_pooled": self.acc_pooled, "n_images": self.n_images,
                "asked": dict(self.asked), "correct": dict(self.correct), "parents": self.parents,
                "questions": [q.to_dict() for q in self.questions],
                "per_image": list(self.per_image), "not_judged": dict(self.not_judged), "chance": self.chance}

    def table(self) -> str:
        """A readable per-question table, then the summary lines (percentages)."""
        def pct(x):
            return "   n/a" if x != x else f"{100 * x:6.1f}"
        w = max([len(q.id) for q in self.questions] + [8])
        lines = [f"{'question':<{w}}  {'kind':<7} {'asked':>6} {'acc%':>6} {'unif%':>6} {'major%':>6}  majority answer",
                 "-" * (w + 50)]
        for q in self.questions:
            lines.append(f"{q.id:<{w}}  {q.kind:<7} {q.asked:6d} {pct(q.accuracy)} {pct(q.chance_uniform)} "
                         f"{pct(q.chance_majority)}  {q.majority_answer}")
        lines.append("-" * (w + 50))
        for k in KINDS:
            lines.append(f"{ACC_NAMES[k]:<{w}}  {pct(self.by_kind[k])} %  ({self.correct[k]}/{self.asked[k]})")
        lines.append(f"{'Acc_all':<{w}}  {pct(self.acc_all)} %  (mean of the three kinds; pooled "
                     f"{pct(self.acc_pooled).strip()} %) over {self.n_images} images")
        if self.not_judged:
            lines.append(f"not judged (answered by annotations, unknown to the judge): "
                         f"{sum(self.not_judged.values())} answers over {len(self.not_judged)} questions")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, ax=None, title: str | None = None):
        """Bar chart of per-question accuracy, with both chance levels marked; returns the figure."""
        import matplotlib.pyplot as plt

        qs = self.questions
        if ax is None:
            fig, ax = plt.subplots(figsize=(8, 0.28 * len(qs) + 1.2))
        else:
            fig = ax.figure
        colours = {"object": "tab:blue", "texture": "tab:orange", "shape": "tab:green"}
        y = list(range(len(qs)))
        ax.barh(y, [100 * q.accuracy for q in qs], color=[colours[q.kind] for q in qs], alpha=0.8)
        for i, q in enumerate(qs):
            ax.plot([100 * q.chance_uniform] * 2, [i - 0.4, i + 0.4], color="k", lw=1.5)
            ax.plot([100 * q.chance_majority] * 2, [i - 0.4, i + 0.4], color="r", lw=1.5, ls=":")
        ax.set_yticks(y, [q.id for q in qs], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
        handles = [Patch(color=c, label=f"{k} (Acc={100 * self.by_kind[k]:.1f})") for k, c in colours.items()]
        handles += [Line2D([], [], color="k", label="chance: uniform"),
                    Line2D([], [], color="r", ls=":", label="chance: majority answer")]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(title or f"Semantic accuracy: Acc_all = {100 * self.acc_all:.1f} % ({self.n_images} images)")
        fig.tight_layout()
        return fig


def _answers_of(ref: Annotation | Mapping[str, str], protocol: Protocol, i: int) -> dict[str, str]:
    if isinstance(ref, Annotation):
        return ref.answers
    if isinstance(ref, Mapping):
        if "answers" in ref and isinstance(ref["answers"], Mapping):
            ref = ref["answers"]
        return Annotation(dict(ref), protocol=protocol).answers  # validates
    raise TypeError(f"references[{i}] must be an Annotation or a mapping of question id -> answer, "
                    f"got {type(ref).__name__}")


def semantic_accuracy(judged: Sequence[Mapping[str, str]],
                      references: Sequence[Annotation | Mapping[str, str]],
                      judge_questions: Iterable[str] | None = None,
                      protocol: Protocol | None = None,
                      parents: str = "dsg") -> SemanticAccuracy:
    """Sec. 5.1: score the judge's answers `judged[i]` against the annotation `references[i]`.

    `judge_questions`: the questions the judge can answer (`Judge.questions`); default: every question
    that appears in any of `judged`. Annotation answers to other questions go to `not_judged`.
    A question the judge claims to answer but left out of `judged[i]` counts as wrong.
    """
    protocol = protocol or load_protocol()
    if parents not in PARENT_RULES:
        raise ValueError(f"parents={parents!r} is not a rule; use one of {PARENT_RULES}")
    if len(judged) != len(references):
        raise ValueError(f"judged has {len(judged)} images but references has {len(references)}; "
                         "pass one judged answer dict per reference annotation, in the same order")
    refs = [_answers_of(r, protocol, i) for i, r in enumerate(references)]
    if judge_questions is None:
        judge_questions = {qid for j in judged for qid in j}
    judge_questions = set(judge_questions)
    unknown = sorted(judge_questions - set(protocol.question_ids))
    if unknown:
        raise KeyError(f"judge_questions holds ids not in the protocol: {unknown}")

    special = set(protocol.special_answers)
    asked: Counter = Counter()
    correct: Counter = Counter()
    parent_fail: Counter = Counter()
    ref_answers: dict[str, Counter] = {}
    not_judged: Counter = Counter()
    per_image = []
    for i, (j, ref) in enumerate(zip(judged, refs)):
        if not isinstance(j, Mapping):
            raise TypeError(f"judged[{i}] must be a dict of question id -> answer, got {type(j).__name__}")
        n_img = ok_img = 0
        for qid, truth in ref.items():
            if truth in special:
                continue  # nothing to check: the annotation itself says not visible / not applicable
            if qid not in judge_questions:
                not_judged[qid] += 1
                continue
            q = protocol.question(qid)
            ok = j.get(qid) == truth
            if ok and parents == "dsg":
                # DSG: a child question cannot be right if the judge denies what it depends on.
                for dep, needed in q.requires:
                    if dep in judge_questions and j.get(dep) != needed:
                        ok = False
                        parent_fail[qid] += 1
                        break
            asked[qid] += 1
            correct[qid] += ok
            ref_answers.setdefault(qid, Counter())[truth] += 1
            n_img += 1
            ok_img += ok
        per_image.append(ok_img / n_img if n_img else float("nan"))

    rows = []
    for q in protocol.questions:
        if asked[q.id]:
            top, top_n = ref_answers[q.id].most_common(1)[0]
            rows.append(QuestionScore(q.id, q.kind, q.group, asked[q.id], correct[q.id], q.chance,
                                      top_n / asked[q.id], top, parent_fail[q.id]))
    kind_asked = {k: sum(r.asked for r in rows if r.kind == k) for k in KINDS}
    kind_correct = {k: sum(r.correct for r in rows if r.kind == k) for k in KINDS}
    acc = {k: kind_correct[k] / kind_asked[k] if kind_asked[k] else float("nan") for k in KINDS}
    present = [acc[k] for k in KINDS if kind_asked[k]]
    total = sum(kind_asked.values())
    return SemanticAccuracy(
        acc_obj=acc["object"], acc_tex=acc["texture"], acc_shape=acc["shape"],
        acc_all=sum(present) / len(present) if present else float("nan"),
        acc_pooled=sum(kind_correct.values()) / total if total else float("nan"),
        n_images=len(refs), asked=kind_asked, correct=kind_correct, questions=rows,
        per_image=per_image, not_judged=dict(not_judged), parents=parents)


def evaluate(judge: Any, images: Any, references: Sequence[Annotation | Mapping[str, str]],
             protocol: Protocol | None = None, parents: str = "dsg") -> SemanticAccuracy:
    """Ask `judge` (a `judge.Judge`) about `images`, then score against `references` (Sec. 5.1)."""
    judged = judge.answer(images)
    return semantic_accuracy(judged, references, judge_questions=judge.questions,
                             protocol=protocol, parents=parents)


def paired_difference(per_image_a: Sequence[float], per_image_b: Sequence[float], resamples: int = 2000,
                      seed: int = 0) -> dict:
    """Is model a's semantic accuracy different from model b's on the same prompts? (Sec. 5.1, Table 4 style)

    Takes two `SemanticAccuracy.per_image` lists (image i generated from the same caption and seed by both
    models) and returns the mean of a − b over the images both scored, with a 95 % bootstrap interval from
    resampling the images: {"mean", "ci95": [lo, hi], "images"}. An interval that holds 0 means the evaluation
    cannot tell the two apart at this size; a few dozen images leave a few points either way.
    """
    import numpy as np
    if len(per_image_a) != len(per_image_b):
        raise ValueError(f"per_image lists differ in length ({len(per_image_a)} vs {len(per_image_b)}); both models "
                         "must be scored on the same images in the same order")
    d = np.asarray(per_image_a, float) - np.asarray(per_image_b, float)
    d = d[~np.isnan(d)]
    if not len(d):
        raise ValueError("no image was scored by both models (every per_image value is nan)")
    boot = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(1)
    return {"mean": float(d.mean()), "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "images": int(len(d))}


def generate_images(pipe, prompts: Sequence[str], steps: int = 20, guidance: float = 5.0, seed: int = 0,
                    batch: int = 8):
    """Images (N, H, W, 3) uint8 for `prompts`, image i from its own generator seeded `seed + i`."""
    import numpy as np
    import torch

    images = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np")
        images.append((out.images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(images)


def generation_accuracy(pipe, judge: Any, annotations: Sequence[Annotation], steps: int = 20,
                        guidance: float = 5.0, seed: int = 0, batch: int = 8):
    """Semantic accuracy (Sec. 5.1) of images generated from the captions of `annotations`, read by `judge`.

    Returns (SemanticAccuracy, images). A model that ignores its prompt scores about the chance levels.
    """
    from .captions import compose
    images = generate_images(pipe, [compose(a).text for a in annotations], steps, guidance, seed, batch)
    return evaluate(judge, images, annotations), images
