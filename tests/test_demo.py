"""The main job, `cosmiclite demo`, end to end in its quick form on the shipped toy model."""
import json

import pytest

from cosmiclite.cli import main
from cosmiclite.models import TOY_MODEL_DIR


@pytest.mark.slow
def test_demo_quick_writes_a_report_with_every_model_measured(tmp_path, capsys):
    if not (TOY_MODEL_DIR / "model_index.json").is_file():
        pytest.fail(f"the toy model is not shipped at {TOY_MODEL_DIR}: the demo needs it")
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert set(summary["models"]) == {"base", "lora_noise_only", "lora_hola"}
    for m in summary["models"].values():
        assert 0.0 <= m["alignment"]["mean_mass"] <= 1.0
        assert m["alignment"]["by_group"], "no group was measured"
        assert m["alignment"]["specificity_by_res"]["16"] > 0   # the report leads with part specificity
        assert 0.0 <= m["accuracy"]["acc_all"] <= 1.0
    # the two fine-tunes differ only by beta: only the HOLA run logs a HOLA loss
    assert "hola_loss" in summary["final_losses"]["lora_hola"]
    assert "hola_loss" not in summary["final_losses"]["lora_noise_only"]
    for name in ("01_toy_people.png", "02_mask_set.png", "03_losses.png", "04_alignment.png", "05_accuracy.png",
                 "06_samples.png", "attention_base.png", "attention_lora_hola.png", "04_part_matrix.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "| **mean over groups** |" in report and "chance (uniform guess)" in report
    d = summary["hola_minus_noise_only"]                 # the paired comparison, with its interval
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1] and d["images"] > 0
    assert "HOLA minus noise only" in report
    assert report.index("Part specificity") < report.index("Attention mass inside")
    assert "part specificity" in capsys.readouterr().out
