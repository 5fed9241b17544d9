"""Datasets of people with parsing maps and protocol answers (CosmicMan-HQ's layout, Sec. 3.3), and the
training batches HOLA needs (Sec. 4.2): pixels, caption token ids, group spans and group masks.

On disk a dataset is a Hugging Face `datasets` imagefolder, so `datasets.load_dataset("imagefolder",
data_dir=DIR)` opens it with an `image` and a `parsing` column:

    DIR/images/000000.png       RGB image
    DIR/parsing/000000.png      parsing map, one label index per pixel (mode "L"), label set in metadata
    DIR/metadata.jsonl          {"file_name": "images/000000.png", "parsing_file_name": "parsing/000000.png",
                                 "label_set": "atr", "caption": "...", "annotation": {question id: answer},
                                 "source": "toyworld", "seed": 0}

("*_file_name" keys are what `datasets` turns into extra image columns.)

Training sees one dict per sample and `collate` stacks them:
    pixel_values (B, 3, H, W) in [-1, 1]; input_ids (B, 77); spans (B, G, 2) half-open token spans of the
    G mask groups (-1 where the caption has no such group); masks {res: (B, G, res, res)} in [0, 1];
    present (B, G) bool (the group has pixels). G and its order are `masks.mask_set`'s group names.

Readers for real data skip corrupt or mismatched files and say so: every reader returns a `ReadReport`
with the count and the reason of each skip, and `strict=True` raises instead. Two real layouts are read:
a folder of images + SCHP parsing PNGs (ATR or LIP labels) + annotation JSONs, and DeepFashion-MultiModal
(images/, segm/*_segm.png, labels/shape/shape_anno_all.txt, labels/texture/{pattern,fabric}_ann.txt),
whose labels are mapped onto the protocol where a mapping exists (`DFMM_*` tables below).

But: DeepFashion-MultiModal's colour words are not released as labels, so its colour questions stay
unanswered; its "not long-sleeve", "square" neckline, "other" fabric/pattern have no protocol answer.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .captions import compose
from .discretize import discretize, discretize_text
from .masks import LABEL_SETS, group_labels, label_names, mask_set
from .protocol import NOT_VISIBLE, Annotation, AnnotationError, Protocol, load_protocol
from .toyworld import render

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --- reports -------------------------------------------------------------------------------------------
@dataclass
class ReadReport:
    """What a reader read and what it skipped (path, reason): long runs never crash, never skip silently."""
    read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, path, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(r.split(":")[0] for _, r in self.skipped))

    def __str__(self) -> str:
        lines = [f"read {self.read}, skipped {len(self.skipped)}"]
        lines += [f"  {n} x {r}" for r, n in self.by_reason().items()]
        return "\n".join(lines)


@dataclass
class Record:
    """One sample: image (H, W, 3) uint8, parsing (H, W) uint8 in `label_set`, its annotation, caption."""
    image: np.ndarray
    parsing: np.ndarray | None
    annotation: Annotation | None
    label_set: str = "atr"
    caption: str | None = None
    name: str = ""


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _load_labels(path: Path) -> np.ndarray:
    """A parsing PNG as label indices: mode L/P/I give their indices; RGB maps are refused (colours are
    not labels)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"parsing map mode {im.mode!r}: expected a label-index PNG (mode L or P)")
        return np.asarray(im).astype(np.uint8 if im.mode in ("L", "P") else np.int64)


def _check_record(image: np.ndarray, parsing: np.ndarray | None, label_set: str) -> str | None:
    """Why a record cannot be used (None if it can)."""
    if parsing is None:
        return None
    if parsing.shape != image.shape[:2]:
        return f"size mismatch: image {image.shape[1]}x{image.shape[0]}, parsing {parsing.shape[1]}x{parsing.shape[0]}"
    n = len(label_names(label_set))
    if parsing.size and (parsing.max() >= n or parsing.min() < 0):
        bad = sorted(int(v) for v in np.unique(parsing) if v >= n or v < 0)
        return f"unknown labels: {bad} not in the {label_set!r} label set (0..{n - 1})"
    return None


# --- the imagefolder layout ------------------------------------------------------------------------------
def write_imagefolder(records: Iterable, out: str | Path, *, label_set: str = "atr", source: str = "toyworld",
                      overwrite: bool = False, total: int | None = None) -> Path:
    """Write people (toyworld `Person`s or `Record`s) as a Hugging Face imagefolder dataset (see above)."""
    out = Path(out)
    meta = out / "metadata.jsonl"
    if meta.exists() and not overwrite:
        raise FileExistsError(f"{meta} exists; pass overwrite=True (CLI: --overwrite) or choose another folder")
    if label_set not in LABEL_SETS:
        raise ValueError(f"unknown label set {label_set!r}; use one of {', '.join(LABEL_SETS)}")
    for sub in ("images", "parsing"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("[0-9]*.png"):  # stale files of an overwritten dataset
            old.unlink()
    lines = []
    for i, r in enumerate(tqdm(records, total=total, desc="writing people", unit="img")):
        stem = f"{i:06d}"
        Image.fromarray(np.asarray(r.image, np.uint8)).save(out / "images" / f"{stem}.png", compress_level=6)
        row = {"file_name": f"images/{stem}.png"}
        if r.parsing is not None:
            Image.fromarray(np.asarray(r.parsing, np.uint8), mode="L").save(out / "parsing" / f"{stem}.png")
            row["parsing_file_name"] = f"parsing/{stem}.png"
        ann = r.annotation
        row["label_set"] = getattr(r, "label_set", label_set)
        row["caption"] = getattr(r, "caption", None) or (compose(ann).text if ann is not None else "")
        row["annotation"] = dict(ann.answers) if ann is not None else {}
        row["source"] = source
        if hasattr(r, "seed"):
            row["seed"] = int(r.seed)
        lines.append(json.dumps(row))
    meta.write_text("\n".join(lines) + ("\n" if lines else ""))
    return out


def read_metadata(root: str | Path) -> list[tuple[str, dict | ValueError]]:
    """The rows of DIR/metadata.jsonl in file order as (where, row), where = "DIR/metadata.jsonl:LINE"; a line that
    is no JSON object gives its ValueError in the row's place, for the caller to skip or raise in turn. The one
    reader of the metadata file."""
    meta = Path(root) / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: {root} is not an imagefolder dataset written by "
                                "cosmiclite (make one with `cosmiclite toyworld --n 32 --out DIR`)")
    rows: list[tuple[str, dict | ValueError]] = []
    for k, line in enumerate(meta.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"bad data: line is a JSON {type(row).__name__}, not an object")
        except ValueError as e:
            row = e
        rows.append((f"{meta}:{k + 1}", row))
    return rows


def read_imagefolder(root: str | Path, *, strict: bool = False,
                     protocol: Protocol | None = None) -> tuple[list[Record], ReadReport]:
    """Read a dataset written by `write_imagefolder` (or any imagefolder with the same metadata)."""
    root = Path(root)
    report, records = ReadReport(), []
    for where, row in read_metadata(root):
        try:
            if isinstance(row, ValueError):
                raise row
            img_path = root / row["file_name"]
            image = _load_rgb(img_path)
            parsing = _load_labels(root / row["parsing_file_name"]) if row.get("parsing_file_name") else None
            label_set = row.get("label_set", "atr")
            if label_set not in LABEL_SETS:
                raise ValueError(f"unknown label set: {label_set!r}")
            problem = _check_record(image, parsing, label_set)
            if problem:
                raise ValueError(problem)
            ann = Annotation.from_dict({"answers": row.get("annotation") or {}}, protocol)
        except (OSError, ValueError, KeyError) as e:
            reason = _reason(e)
            if strict:
                raise ValueError(f"{where}: {reason}") from e
            report.skip(where, reason)
            continue
        records.append(Record(image, parsing, ann, label_set, row.get("caption"), row["file_name"]))
        report.read += 1
    return records, report


def _reason(e: Exception) -> str:
    if isinstance(e, AnnotationError):
        return "invalid annotation: " + "; ".join(e.errors)
    if isinstance(e, KeyError):
        return f"missing field: {e.args[0]!r}"
    if isinstance(e, FileNotFoundError):
        return f"missing file: {e.filename or e}"
    if isinstance(e, json.JSONDecodeError):
        return f"bad JSON: {e.msg}"
    if isinstance(e, OSError):
        return f"unreadable file: {e}"
    msg = str(e)
    return msg if ":" in msg[:40] else f"bad data: {msg}"


# --- real data: SCHP output folders ------------------------------------------------------------------------
def read_parsed_folder(images: str | Path, parsing: str | Path, annotations: str | Path | None = None, *,
                       label_set: str = "atr", strict: bool = False,
                       protocol: Protocol | None = None) -> tuple[list[Record], ReadReport]:
    """Images + parsing maps as SCHP writes them (`<stem>.png` of label indices, ATR or LIP) + optional
    annotation JSONs (`<stem>.json`, the `protocol.Annotation` format). Pairs are matched by file stem."""
    if label_set not in ("atr", "lip"):
        raise ValueError(f"label_set {label_set!r}: SCHP folders hold 'atr' or 'lip' maps "
                         "(use read_deepfashion_mm for DeepFashion-MultiModal)")
    images, parsing = Path(images), Path(parsing)
    for d in (images, parsing):
        if not d.is_dir():
            raise FileNotFoundError(f"folder {d} does not exist")
    report, records = ReadReport(), []
    for img_path in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        stem = img_path.stem
        try:
            seg_path = parsing / f"{stem}.png"
            if not seg_path.is_file():
                raise ValueError(f"no parsing map: {seg_path.name} missing in {parsing}")
            image, seg = _load_rgb(img_path), _load_labels(seg_path)
            problem = _check_record(image, seg, label_set)
            if problem:
                raise ValueError(problem)
            ann = None
            if annotations is not None:
                ann_path = Path(annotations) / f"{stem}.json"
                if not ann_path.is_file():
                    raise ValueError(f"no annotation: {ann_path.name} missing in {annotations}")
                ann = Annotation.load(ann_path, protocol)
        except (OSError, ValueError, KeyError) as e:
            if strict:
                raise ValueError(f"{img_path}: {_reason(e)}") from e
            report.skip(img_path, _reason(e))
            continue
        records.append(Record(image, seg, ann, label_set, None, img_path.name))
        report.read += 1
    return records, report


# --- real data: DeepFashion-MultiModal ----------------------------------------------------------------------
# Its label files (labels/shape/shape_anno_all.txt: "<img> s0 .. s11"; labels/texture/pattern_ann.txt and
# fabric_ann.txt: "<img> upper lower outer") mapped onto protocol answers; "NA" (part not visible) maps to
# "not visible"; values without a protocol answer are left unanswered.
DFMM_SHAPE = {
    0: ("sleeve_length", {0: "sleeveless", 1: "short sleeve", 2: "elbow sleeve", 3: "long sleeve", 5: NOT_VISIBLE}),
    1: ("lower_length", {0: "short", 1: "knee-length", 2: "three-quarter", 3: "full-length", 4: NOT_VISIBLE}),
    2: ("socks", {0: "nothing"}),
    3: ("wear_hat", {0: "no", 1: "yes", 2: NOT_VISIBLE}),
    4: ("eyewear", {0: ("no", None), 1: ("yes", "glasses"), 2: ("yes", "sunglasses"), 3: ("no", None),
                    4: (NOT_VISIBLE, None)}),
    5: ("neckwear", {0: "no"}),
    6: ("wristwear", {0: "nothing"}),
    8: ("wear_belt", {0: "no", 1: "yes", 2: "no", 3: NOT_VISIBLE, 4: NOT_VISIBLE}),
    9: ("collar", {0: "v-neck", 2: "crew neck", 4: "collar", 5: "collar", 7: NOT_VISIBLE}),
    11: ("navel", {0: "cropped"}),
}
DFMM_PATTERN = {0: "floral", 1: "graphic", 2: "striped", 3: "solid color", 4: "plaid", 7: NOT_VISIBLE}
DFMM_FABRIC = {0: "denim", 1: "cotton", 2: "leather", 4: "knit", 5: "chiffon", 7: NOT_VISIBLE}
_DRESS_LENGTH = {"short": "mini", "knee-length": "knee-length", "three-quarter": "midi", "full-length": "maxi"}


def _read_label_file(path: Path, n_values: int) -> dict[str, list[int]]:
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == n_values + 1 and all(p.lstrip("-").isdigit() for p in parts[1:]):
            out[parts[0]] = [int(p) for p in parts[1:]]
    return out


def dfmm_answers(segm: np.ndarray | None, shape: Sequence[int] | None, pattern: Sequence[int] | None,
                 fabric: Sequence[int] | None, protocol: Protocol | None = None) -> dict[str, str]:
    """DeepFashion-MultiModal labels of one image -> protocol answers (only where a mapping exists)."""
    protocol = protocol or load_protocol()
    a: dict[str, str] = {}
    has = set(np.unique(segm).tolist()) if segm is not None else None
    if has is not None:  # what is worn, from the parsing map (DFMM parses full-body images only)
        a["wear_top"] = "yes" if has & {1, 2} else "no"
        a["wear_dress"] = "yes" if has & {4, 21} else "no"
        a["wear_bottoms"] = "yes" if has & {3, 5, 6} else "no"
        a["wear_shoes"] = "yes" if 11 in has else "no"
        a["wear_bag"] = "yes" if 12 in has else "no"
        a["wear_hat"] = "yes" if 7 in has else "no"
        if has & {3, 5, 6}:
            a["bottoms_type"] = "skirt" if 3 in has else "leggings" if 6 in has and 5 not in has else "pants"
    if shape is not None:
        for col, (key, table) in DFMM_SHAPE.items():
            v = table.get(shape[col]) if col < len(shape) else None
            if v is None:
                continue
            if key == "eyewear":
                a["wear_eyewear"] = v[0]
                if v[1]:
                    a["eyewear_type"] = v[1]
            elif key == "lower_length":
                if a.get("wear_bottoms") == "yes":
                    a["bottoms_length"] = v
                elif a.get("wear_dress") == "yes":
                    a["dress_length"] = _DRESS_LENGTH.get(v, v)
            elif key == "neckwear":
                a["wear_scarf"] = v
            elif key == "navel":
                a["top_length"] = v
            else:
                a[key] = v
    for values, table, targets in ((pattern, DFMM_PATTERN, ("top_pattern", "bottoms_pattern")),
                                   (fabric, DFMM_FABRIC, ("top_material", "bottoms_material"))):
        if values is None:
            continue
        upper, lower = table.get(values[0]), table.get(values[1])
        if a.get("wear_top") == "yes" and upper:
            a[targets[0]] = upper
        elif a.get("wear_dress") == "yes" and upper and targets[0] == "top_pattern":
            a["dress_pattern"] = upper
        if a.get("wear_bottoms") == "yes" and lower:
            a[targets[1]] = lower
    # keep only answers the protocol accepts here (vocabulary and `requires`)
    for _ in range(3):
        errors = protocol.check(a)
        if not errors:
            break
        bad = {e.split("'")[1] for e in errors if e.startswith("question '")}
        a = {k: v for k, v in a.items() if k not in bad}
    return a


def read_deepfashion_mm(root: str | Path, *, strict: bool = False, limit: int | None = None,
                        protocol: Protocol | None = None) -> tuple[list[Record], ReadReport]:
    """DeepFashion-MultiModal: images/<name>.jpg, segm/<name>_segm.png (24 labels, "dfmm" set),
    labels/shape/shape_anno_all.txt, labels/texture/pattern_ann.txt and fabric_ann.txt (the
    `*_anno_all.txt` spellings are accepted too). Images without a parsing map are read without one."""
    root = Path(root)
    img_dir = root / "images" if (root / "images").is_dir() else root / "image"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{root} has no images/ folder: is it the DeepFashion-MultiModal root?")
    seg_dir = root / "segm" if (root / "segm").is_dir() else root / "parsing"
    tex = root / "labels" / "texture"

    def first(*paths):
        return next((p for p in paths if p.is_file()), paths[0])

    shape = _read_label_file(first(root / "labels" / "shape" / "shape_anno_all.txt",
                                   root / "labels" / "shape_anno_all.txt"), 12)
    pattern = _read_label_file(first(tex / "pattern_ann.txt", tex / "pattern_anno_all.txt",
                                     root / "labels" / "pattern_ann.txt"), 3)
    fabric = _read_label_file(first(tex / "fabric_ann.txt", tex / "fabric_anno_all.txt",
                                    root / "labels" / "fabric_ann.txt"), 3)
    report, records = ReadReport(), []
    paths = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    for img_path in paths[:limit]:
        name = img_path.name
        try:
            image = _load_rgb(img_path)
            seg_path = seg_dir / f"{img_path.stem}_segm.png"
            seg = _load_labels(seg_path) if seg_path.is_file() else None
            problem = _check_record(image, seg, "dfmm")
            if problem:
                raise ValueError(problem)
            answers = dfmm_answers(seg, shape.get(name), pattern.get(name), fabric.get(name), protocol)
            ann = Annotation(answers, image=name, source="DeepFashion-MultiModal", protocol=protocol)
        except (OSError, ValueError, KeyError) as e:
            if strict:
                raise ValueError(f"{img_path}: {_reason(e)}") from e
            report.skip(img_path, _reason(e))
            continue
        records.append(Record(image, seg, ann, "dfmm", None, name))
        report.read += 1
    return records, report


# --- training samples ---------------------------------------------------------------------------------------
def training_sample(image: np.ndarray | None, parsing: np.ndarray | None, annotation: Annotation | None, *,
                    label_set: str = "atr", mask_sizes: Sequence[int] = (8, 16, 32), tokenizer=None,
                    caption_fn: Callable | None = None, caption: str | None = None) -> dict:
    """One training sample (Sec. 4.2): pixel_values (3, H, W) in [-1, 1], input_ids (77,), spans (G, 2),
    masks {res: (G, res, res)}, present (G,), caption. Captions come from `captions.compose` (or `caption_fn`,
    e.g. training's augmentation) and spans from `discretize` over the mask groups; a plain `caption` string (no
    annotation) takes `discretize_text`. The one batch builder: notebooks, `PeopleDataset` and training use it.

    image None: no pixel_values (training from a latent pool). mask_sizes empty: no masks and no present (a run
    without HOLA). A missing parsing map gives every group absent.
    """
    out = {}
    if image is not None:
        out["pixel_values"] = to_pixels(image)
    names = group_labels()
    if mask_sizes:
        if parsing is None:   # no map: every group absent
            parsing = np.zeros(image.shape[:2] if image is not None else (max(mask_sizes),) * 2, np.uint8)
        ms = mask_set(parsing, label_set, mask_sizes)
        names = ms.names
        out["masks"], out["present"] = ms.masks, ms.present
    if annotation is not None:
        d = discretize((caption_fn or compose)(annotation), tokenizer)
    else:
        d = discretize_text(caption or "", tokenizer)
    out["input_ids"] = torch.tensor(d.input_ids, dtype=torch.long)
    out["spans"] = torch.tensor(d.spans(names), dtype=torch.long)
    out["caption"] = d.caption
    return out


def to_pixels(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 images (H, W, 3), or a batch of them, -> float (3, H, W) / (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(np.stack(images) if isinstance(images, (list, tuple)) else images, np.uint8))
    return x.movedim(-1, -3).float() / 127.5 - 1.0


def collate(batch: Sequence[dict]) -> dict:
    """Stack samples: pixel_values (B,3,H,W), input_ids (B,77), spans (B,G,2), masks {res: (B,G,res,res)},
    present (B,G), caption (list of B strings); the keys the samples have."""
    if not batch:
        raise ValueError("collate got an empty batch")
    first = batch[0]
    out = {k: torch.stack([b[k] for b in batch]) for k in ("pixel_values", "input_ids", "spans", "present")
           if k in first}
    if "masks" in first:
        out["masks"] = {r: torch.stack([b["masks"][r] for b in batch]) for r in first["masks"]}
    out["caption"] = [b["caption"] for b in batch]
    return out


class PeopleDataset(Dataset):
    """Training samples from `Record`s (e.g. `read_imagefolder(DIR)[0]`, or a real-data reader's)."""

    def __init__(self, records: Sequence[Record], mask_sizes: Sequence[int] = (8, 16, 32), tokenizer=None,
                 caption_fn: Callable | None = None):
        self.records, self.mask_sizes = list(records), tuple(mask_sizes)
        self.tokenizer, self.caption_fn = tokenizer, caption_fn

    @classmethod
    def from_folder(cls, root: str | Path, **kw) -> "PeopleDataset":
        records, report = read_imagefolder(root)
        if report.skipped:
            warnings.warn(f"{root}: {report}", stacklevel=2)
        ds = cls(records, **kw)
        ds.report = report
        return ds

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return training_sample(r.image, r.parsing, r.annotation, label_set=r.label_set, mask_sizes=self.mask_sizes,
                               tokenizer=self.tokenizer, caption_fn=self.caption_fn, caption=r.caption)


class ToyWorldDataset(Dataset):
    """Toy-world people drawn on the fly: item i is `toyworld.render(seed + i)` (no files written)."""

    def __init__(self, n: int, size: int = 64, seed: int = 0, sampling=None, mask_sizes: Sequence[int] = (8, 16, 32),
                 tokenizer=None, caption_fn: Callable | None = None):
        if n < 1:
            raise ValueError(f"n = {n}: a toy-world dataset needs at least one person")
        self.n, self.size, self.seed, self.sampling = int(n), int(size), int(seed), sampling
        self.mask_sizes, self.tokenizer, self.caption_fn = tuple(mask_sizes), tokenizer, caption_fn

    def __len__(self) -> int:
        return self.n

    def person(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} people")
        return render(self.seed + i, self.size, self.sampling)

    def __getitem__(self, i: int) -> dict:
        p = self.person(i)
        return training_sample(p.image, p.parsing, p.annotation, mask_sizes=self.mask_sizes,
                               tokenizer=self.tokenizer, caption_fn=self.caption_fn)


def write_toyworld(n: int, out: str | Path, *, size: int = 64, seed: int = 0, sampling=None,
                   overwrite: bool = False) -> Path:
    """Render people seed .. seed+n-1 and write them as an imagefolder dataset (`cosmiclite toyworld`)."""
    if n < 1:
        raise ValueError(f"--n {n}: write at least one person")
    people = (render(seed + i, size, sampling) for i in range(n))
    return write_imagefolder(people, out, source="toyworld", overwrite=overwrite, total=n)


# --- dataset statistics (Table 1) ------------------------------------------------------------------------------
def dataset_card(root: str | Path, protocol: Protocol | None = None) -> dict:
    """Table-1-style statistics of an imagefolder dataset (Sec. 3.3): images, mean resolution, shot types
    ("common scale"), categories answered, attribute labels (answers that are not "not visible"/"not
    applicable"), and per category the count of each answer. Unreadable rows are counted under "skipped"."""
    protocol = protocol or load_protocol()
    root = Path(root)
    per_q: dict[str, Counter] = {q: Counter() for q in protocol.question_ids}
    sizes, n_parsing, n_caption, report = [], 0, 0, ReadReport()
    for where, row in read_metadata(root):
        try:
            if isinstance(row, ValueError):
                raise row
            with Image.open(root / row["file_name"]) as im:
                sizes.append(im.size)
            answers = Annotation.from_dict({"answers": row.get("annotation") or {}}, protocol).answers
        except (OSError, ValueError, KeyError) as e:
            report.skip(where, _reason(e))
            continue
        report.read += 1
        n_parsing += bool(row.get("parsing_file_name"))
        n_caption += bool(row.get("caption"))
        for q, a in answers.items():
            per_q[q][a] += 1
    special = set(protocol.special_answers)
    real = {q: {a: n for a, n in c.most_common() if a not in special} for q, c in per_q.items()}
    n_attr = sum(sum(v.values()) for v in real.values())
    images = report.read
    return {
        "images": images,
        "mean_resolution": [round(float(np.mean([s[0] for s in sizes])), 1) if sizes else 0.0,
                            round(float(np.mean([s[1] for s in sizes])), 1) if sizes else 0.0],
        "shot_types": real.get("shot_type", {}),
        "categories": sum(1 for v in real.values() if v),
        "categories_in_protocol": len(protocol.questions),
        "attributes": n_attr,
        "attributes_per_image": round(n_attr / images, 2) if images else 0.0,
        "with_parsing": n_parsing, "with_caption": n_caption,
        "per_category": real,
        "special_answers": {q: {a: c[a] for a in protocol.special_answers if c[a]} for q, c in per_q.items()},
        "skipped": len(report.skipped), "skip_reasons": report.by_reason(),
    }


def plot_dataset_card(card: dict, path: str | Path) -> Path:
    """A bar chart of a `dataset_card`: attribute labels per category, split by answer (PNG).

    Drawn on a bare `matplotlib.figure.Figure`, not through pyplot: the backend is left as found, so a notebook
    that calls this keeps showing its figures inline."""
    from matplotlib import colormaps  # noqa: PLC0415  (lazy: matplotlib only for this figure)
    from matplotlib.figure import Figure  # noqa: PLC0415

    cats = [(q, v) for q, v in card["per_category"].items() if v]
    fig_h = max(3.0, 0.22 * len(cats) + 1.2)
    fig = Figure(figsize=(9, fig_h), dpi=100)
    ax = fig.subplots()
    tab20 = colormaps["tab20"]
    for i, (q, v) in enumerate(cats):
        left = 0
        for j, (a, n) in enumerate(v.items()):
            ax.barh(i, n, left=left, color=tab20(j % 20), edgecolor="white", linewidth=0.5)
            if n >= 0.06 * max(1, card["images"]):
                ax.text(left + n / 2, i, a, ha="center", va="center", fontsize=6)
            left += n
    ax.set_yticks(range(len(cats)), [q for q, _ in cats], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images with this answer")
    w, h = card["mean_resolution"]
    ax.set_title(f"{card['images']} images, mean {w:.0f}x{h:.0f}, {card['categories']} categories, "
                 f"{card['attributes']} attribute labels", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
