"""The `cosmiclite` command line and its JSON contracts (README: "Command line")."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cosmiclite.cli import main

FIG3 = str(Path(__file__).parents[1] / "data_samples" / "annotations" / "fig3_example.json")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_protocol_json(capsys):
    code, out, _ = run(capsys, "protocol", "--json")
    d = json.loads(out)
    assert code == 0 and len(d["parts"]) == 18 and len(d["questions"]) == 70
    assert {"id", "atr_label", "name"} <= set(d["parts"][0])
    assert {"id", "part", "kind", "answers", "group", "text", "global"} <= set(d["questions"][0])
    assert d["parts"][2] == {**d["parts"][2], "id": "hair", "atr_label": 2}


def test_protocol_text(capsys):
    code, out, _ = run(capsys, "protocol")
    assert code == 0 and "18 parts" in out and "70 questions" in out and "hair_color" in out


def test_caption_json(capsys):
    code, out, _ = run(capsys, "caption", FIG3, "--json")
    d = json.loads(out)
    assert code == 0
    assert d["caption"].startswith("A full-body shot, an adult female, fit, small road with trees")
    assert len(d["input_ids"]) == 77 and d["input_ids"][:2] == [49406, 320]
    names = [g["name"] for g in d["groups"]]
    assert names == ["body", "other", "hair", "tops", "bottoms", "legs", "shoes", "bag"]
    for g in d["groups"]:
        s, e = g["span"]
        assert 1 <= s < e <= 76 and isinstance(g["phrases"], list)
    assert d["lost_groups"] == []
    assert all(d["caption"][p["start"]:p["end"]] == p["text"] for p in d["phrases"])


def test_caption_text_and_drop(capsys):
    code, out, _ = run(capsys, "caption", FIG3, "--drop", "bag")
    assert code == 0 and "body" in out and "[ 1, 12)" in out and "backpack" not in out


def test_discretize_json(capsys):
    code, out, _ = run(capsys, "discretize", "a woman with red hair and oxford shoes", "--json")
    d = json.loads(out)
    assert code == 0 and [g["name"] for g in d["groups"]] == ["body", "hair", "shoes"]
    assert d["groups"][1] == {"name": "hair", "phrases": ["red hair"], "span": [4, 6]}


@pytest.mark.parametrize("argv, needle", [
    (["caption", "no/such/file.json"], "does not exist"),
    (["caption", "{tmp}/bad.json"], "'hair_color'"),
    (["caption", "{tmp}/broken.json"], "not valid JSON"),
    (["caption", FIG3, "--drop", "shoe"], "unknown caption group 'shoe'"),
])
def test_bad_input_exits_2_with_a_message(capsys, tmp_path, argv, needle):
    (tmp_path / "bad.json").write_text('{"answers": {"hair_color": "green"}}')
    (tmp_path / "broken.json").write_text('{"answers": ')
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and needle in err and "Traceback" not in err and out == ""


def test_console_entry_points():
    """`python -m cosmiclite` and the process exit status, as a user's shell sees them."""
    ok = subprocess.run([sys.executable, "-m", "cosmiclite", "protocol", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and len(json.loads(ok.stdout)["questions"]) == 70
    bad = subprocess.run([sys.executable, "-m", "cosmiclite", "caption", "missing.json"], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "cosmiclite", "nope"], capture_output=True, text=True)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
