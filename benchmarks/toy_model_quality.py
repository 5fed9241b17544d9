"""How well the shipped toy model follows its prompts: semantic accuracy (Sec. 5.1) against chance.

Generates one image per held-out toy person (seeds the toy model, the judge and the demo never trained on)
from its composed caption, asks the toy judge every question the annotation answers, and reports
Acc_obj/tex/shape/all beside what uniform guessing scores and what the judge scores on the people's own
renders (the ceiling a perfect generator would reach), plus the attention mass inside the masks
(`alignment.attention_alignment`: mass in mask, part specificity, the group x part matrix). The "ratio" holds
Acc_all over chance (> 1: the prompt is followed), Acc_all over the ceiling, and the part specificity of the
16x16 maps (1: one map shared by every part; far above 1: each group on its own part).

    python benchmarks/toy_model_quality.py [--quick] [--model DIR]

Prints one JSON line and writes benchmarks/results/toy_model_quality-cpu-2core.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 people, 15 steps (default 64 people, 25 steps)")
    ap.add_argument("--model", default=None, help="a toy pipeline folder (default: the shipped toy model)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from cosmiclite.demo import held_out_people
    from cosmiclite.judge import load_judge
    from cosmiclite.metrics import attention_alignment, evaluate, generation_accuracy
    from cosmiclite.models import TOY_MODEL_DIR, load_toy_pipeline

    n, steps = (16, 15) if args.quick else (64, 25)
    folder = Path(args.model) if args.model else TOY_MODEL_DIR
    pipe = load_toy_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    people = held_out_people(n)
    t0 = time.perf_counter()
    judge = load_judge()
    acc, _ = generation_accuracy(pipe, judge, [p.annotation for p in people], steps=steps, guidance=5.0)
    # the ceiling: the same judge on the people's own clean renders (what a perfect generator would score)
    ceiling = evaluate(judge, [p.image for p in people], [p.annotation for p in people])
    align = attention_alignment(pipe, people)
    made = {}
    if (folder / "checkpoint.json").is_file():
        made = json.loads((folder / "checkpoint.json").read_text())
    result = {
        "benchmark": "toy_model_quality", "device": "cpu-2core", "quick": args.quick,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "model": str(folder), "trained_steps": made.get("step"),
        "people": n, "ddim_steps": steps, "guidance": 5.0, "held_out_seeds": [20_000_000, 20_000_000 + n - 1],
        "accuracy": {k: getattr(acc, k) for k in ("acc_obj", "acc_tex", "acc_shape", "acc_all")},
        "chance": acc.chance,
        "judge_on_real_renders": {k: getattr(ceiling, k) for k in ("acc_obj", "acc_tex", "acc_shape", "acc_all")},
        "ratio": {"acc_all_over_chance": acc.acc_all / acc.chance["all"],
                  "acc_all_over_ceiling": acc.acc_all / ceiling.acc_all,
                  "part_specificity_16": align.specificity(16),
                  "attention_mass_over_area": align.mean_lift},
        "per_question": {q.id: {"accuracy": q.accuracy, "chance": q.chance_uniform, "asked": q.asked}
                         for q in acc.questions},
        "attention_mass_in_mask": align.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(__file__).parent / "results" / "toy_model_quality-cpu-2core.json"
    out.parent.mkdir(exist_ok=True)
    if out.is_file():   # the readings before this one move under "earlier", newest first
        before = json.loads(out.read_text())
        earlier = before.pop("earlier", [])
        result["earlier"] = [{k: v for k, v in before.items() if k != "per_question"}] + earlier
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
