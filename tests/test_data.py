"""Datasets: imagefolder round trip, HF load_dataset, training collate, skip reports, real-data readers, CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cosmiclite.data import (
    PeopleDataset,
    ToyWorldDataset,
    collate,
    dataset_card,
    dfmm_answers,
    read_deepfashion_mm,
    read_imagefolder,
    read_parsed_folder,
    write_toyworld,
)
from cosmiclite.protocol import Annotation


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return write_toyworld(6, tmp_path_factory.mktemp("toy") / "ds", size=32, seed=10)


def test_load_dataset_imagefolder_opens_it(toy_dir):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(toy_dir), split="train")
    assert len(ds) == 6
    row = ds[0]
    assert {"image", "parsing", "caption", "annotation", "label_set"} <= set(row)
    assert row["image"].size == (32, 32) and row["parsing"].mode == "L"
    assert row["annotation"]["shot_type"] and row["caption"].endswith(".")


def test_round_trip_and_training_collate(toy_dir):
    from cosmiclite.toyworld import render
    records, report = read_imagefolder(toy_dir)
    assert report.read == 6 and not report.skipped
    p = render(10, 32)
    assert np.array_equal(records[0].image, p.image) and np.array_equal(records[0].parsing, p.parsing)
    assert records[0].annotation.answers == p.annotation.answers
    batch = collate([PeopleDataset(records, mask_sizes=(4, 8))[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert -1.0 <= float(batch["pixel_values"].min()) and float(batch["pixel_values"].max()) <= 1.0
    assert batch["input_ids"].shape == (3, 77) and batch["input_ids"].dtype == torch.long
    assert batch["spans"].shape == (3, 14, 2) and batch["present"].shape == (3, 14)
    assert set(batch["masks"]) == {4, 8} and batch["masks"][8].shape == (3, 14, 8, 8)
    # body (group 0) is always present and always in the caption; absent spans are -1, present ones ordered
    assert batch["present"][:, 0].all() and (batch["spans"][:, 0, 0] == 1).all()
    s = batch["spans"]
    assert ((s[..., 0] == -1) == (s[..., 1] == -1)).all() and (s[..., 1][s[..., 0] >= 0] > s[..., 0][s[..., 0] >= 0]).all()


def test_toyworld_dataset_on_the_fly():
    ds = ToyWorldDataset(4, size=32, seed=3, mask_sizes=(8,))
    b = collate([ds[i] for i in range(len(ds))])
    assert b["pixel_values"].shape == (4, 3, 32, 32) and b["masks"][8].shape == (4, 14, 8, 8)
    with pytest.raises(IndexError):
        ds[4]


def test_corrupt_and_mismatched_files_are_skipped_with_reasons(toy_dir, tmp_path):
    import shutil
    d = tmp_path / "broken"
    shutil.copytree(toy_dir, d)
    (d / "images" / "000001.png").write_bytes(b"not a png")                       # corrupt image
    (d / "parsing" / "000002.png").unlink()                                      # missing parsing
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "parsing" / "000003.png")  # size mismatch
    Image.fromarray(np.full((32, 32), 30, np.uint8)).save(d / "parsing" / "000004.png")  # unknown labels
    lines = (d / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[5])
    row["annotation"]["top_color"] = "teal"                                      # invalid annotation
    lines[5] = json.dumps(row)
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n{broken json\n")
    records, report = read_imagefolder(d)
    assert report.read == len(records) == 1
    reasons = " | ".join(r for _, r in report.skipped)
    assert len(report.skipped) == 6
    for needle in ("unreadable file", "missing file", "size mismatch", "unknown labels: [30]",
                   "invalid annotation", "bad JSON"):
        assert needle in reasons
    assert "skipped 6" in str(report)
    with pytest.raises(ValueError, match="unreadable file"):
        read_imagefolder(d, strict=True)


def test_schp_folder_reader(tmp_path):
    (tmp_path / "img").mkdir(), (tmp_path / "seg").mkdir(), (tmp_path / "ann").mkdir()
    for name, seg_value in (("a", 5), ("b", 19), ("c", 2)):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / f"{name}.jpg")
        Image.fromarray(np.full((8, 8), seg_value, np.uint8)).save(tmp_path / "seg" / f"{name}.png")
        Annotation({"hair_color": "red"}).save(tmp_path / "ann" / f"{name}.json")
    (tmp_path / "ann" / "c.json").unlink()
    recs, rep = read_parsed_folder(tmp_path / "img", tmp_path / "seg", tmp_path / "ann", label_set="lip")
    assert [r.name for r in recs] == ["a.jpg", "b.jpg"] and recs[0].label_set == "lip"
    assert rep.skipped and "no annotation" in rep.skipped[0][1]
    recs, rep = read_parsed_folder(tmp_path / "img", tmp_path / "seg", label_set="atr")
    assert [r.name for r in recs] == ["a.jpg", "c.jpg"] and "unknown labels: [19]" in rep.skipped[0][1]
    b = collate([PeopleDataset(recs[:1], mask_sizes=(4,))[0]])
    assert b["present"][0].tolist()[:1] == [True]


def test_deepfashion_multimodal_layout(tmp_path):
    (tmp_path / "images").mkdir(), (tmp_path / "segm").mkdir()
    (tmp_path / "labels" / "shape").mkdir(parents=True), (tmp_path / "labels" / "texture").mkdir()
    seg = np.zeros((10, 6), np.uint8)
    seg[2:5] = 1   # top
    seg[5:8] = 5   # pants
    seg[9] = 11    # footwear
    seg[0] = 13    # hair
    for name in ("WOMEN-x-01.jpg", "MEN-y-02.jpg"):
        Image.fromarray(np.zeros((10, 6, 3), np.uint8)).save(tmp_path / "images" / name)
    Image.fromarray(seg).save(tmp_path / "segm" / "WOMEN-x-01_segm.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "segm" / "MEN-y-02_segm.png")  # mismatched
    (tmp_path / "labels" / "shape" / "shape_anno_all.txt").write_text(
        "WOMEN-x-01.jpg 1 3 0 0 2 0 0 0 1 0 2 1\nMEN-y-02.jpg 5 4 3 2 4 2 2 2 4 7 2 2\n")
    (tmp_path / "labels" / "texture" / "pattern_ann.txt").write_text("WOMEN-x-01.jpg 2 3 7\n")
    (tmp_path / "labels" / "texture" / "fabric_ann.txt").write_text("WOMEN-x-01.jpg 1 0 7\n")
    recs, rep = read_deepfashion_mm(tmp_path)
    assert len(recs) == 1 and "size mismatch" in rep.skipped[0][1]
    a = recs[0].annotation.answers
    assert a["wear_top"] == "yes" and a["sleeve_length"] == "short sleeve" and a["wear_bottoms"] == "yes"
    assert a["bottoms_type"] == "pants" and a["bottoms_length"] == "full-length"
    assert a["wear_eyewear"] == "yes" and a["eyewear_type"] == "sunglasses" and a["wear_belt"] == "yes"
    assert a["collar"] == "v-neck" and a["top_pattern"] == "striped" and a["bottoms_pattern"] == "solid color"
    assert a["top_material"] == "cotton" and a["bottoms_material"] == "denim" and a["wear_hat"] == "no"
    b = collate([PeopleDataset(recs, mask_sizes=(5,))[0]])
    names = ("body", "hair", "face", "eyewear", "hat", "tops", "dress", "bottoms", "belt", "legs", "shoes")
    assert [n for n, p in zip(names, b["present"][0].tolist()) if p] == ["body", "hair", "tops", "bottoms", "shoes"]
    # a dress gets the lower length as its own; answers failing `requires` are dropped, never kept
    dress = np.full((4, 4), 4, np.uint8)
    d = dfmm_answers(dress, [0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0], [3, 7, 7], None)
    assert d["wear_dress"] == "yes" and d["dress_length"] == "midi" and "sleeve_length" not in d
    assert d["dress_pattern"] == "solid color" and "collar" not in d


def test_dataset_card_and_cli(tmp_path, capsys):
    from cosmiclite.cli import main
    out = tmp_path / "toy"
    assert main(["toyworld", "--n", "5", "--out", str(out), "--size", "32", "--seed", "2"]) == 0
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 5
    assert main(["toyworld", "--n", "5", "--out", str(out)]) == 2  # exists: refused, clear message
    assert "overwrite" in capsys.readouterr().err
    card = dataset_card(out)
    assert card["images"] == 5 and card["mean_resolution"] == [32.0, 32.0] and card["skipped"] == 0
    assert sum(card["per_category"]["shot_type"].values()) == 5
    assert card["attributes"] == sum(sum(v.values()) for v in card["per_category"].values())
    capsys.readouterr()
    assert main(["dataset-card", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 5 and (out / "dataset_card.png").is_file()
    assert main(["dataset-card", str(tmp_path / "nope")]) == 2


def test_the_dataset_card_chart_leaves_the_matplotlib_backend_as_found(tmp_path):
    """In a notebook the inline backend must survive drawing the card, or every later figure vanishes."""
    import matplotlib

    from cosmiclite.cli import main
    from cosmiclite.data import plot_dataset_card
    out = tmp_path / "toy"
    assert main(["toyworld", "--n", "3", "--out", str(out), "--size", "32"]) == 0
    before = matplotlib.get_backend()
    with matplotlib.rc_context({"backend": "svg"}):    # stands in for a notebook's inline backend
        matplotlib.use("svg")
        png = plot_dataset_card(dataset_card(out), tmp_path / "card.png")
        assert matplotlib.get_backend() == "svg"
    matplotlib.use(before)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
