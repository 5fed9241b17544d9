"""How well the toy judge (Sec. 5.1) reads images that look generated: the same held-out people clean, blurred and
noised, and passed through the toy model's VAE (what every generated image goes through last).

    python benchmarks/judge_robustness.py [--people 1000] [--threads 2] [JUDGE.safetensors ...] [--label NAME ...]

For each judge (default: the shipped one) prints and records Acc_all and the four weakest questions on each
version of the images, and the ratio degraded / clean; seeds 0..people-1 (held out from the judge's training).
Parent rule "independent" (each question scored on its own), as the judge's recorded held-out accuracy.
Writes benchmarks/results/judge_robustness-DEVICE.json, adding to the judges recorded there for the same people of
the same toy world ("world": a fingerprint of their images and annotations); judges measured on a world since
changed are kept apart, under "earlier_worlds". Each judge is recorded under its `--label` (one per judge, in
order; e.g. "v11: stage 10 ..."), else under its path (relative to the repository when inside it).
"""
import argparse
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from cosmiclite.judge import JUDGE_WEIGHTS, as_batch, load_judge
from cosmiclite.judge_train import Augment, render_batch, vae_reconstructor
from cosmiclite.metrics import semantic_accuracy
from cosmiclite.models import TOY_MODEL_DIR

RESULTS = Path(__file__).parent / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("judges", nargs="*", default=[str(JUDGE_WEIGHTS)])
    ap.add_argument("--people", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", action="append", default=[], help="the name to record a judge under; give one per "
                    "judge, in the order of the judges (default: the judge's path)")
    args = ap.parse_args(argv)
    if args.label and len(args.label) != len(args.judges):
        ap.error(f"--label was given {len(args.label)} times for {len(args.judges)} judge(s): give one label per "
                 "judge, in the same order, or none")
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    images, annotations = render_batch(range(args.people))
    world = hashlib.sha256(images.tobytes() + json.dumps([a.answers for a in annotations], sort_keys=True).encode()
                           ).hexdigest()[:16]
    clean = as_batch(images, 64)
    rec = vae_reconstructor(AutoencoderKL.from_pretrained(TOY_MODEL_DIR / "vae"))
    versions = {
        "clean": clean,
        "blur_noise": Augment(blur_p=1.0, noise_p=1.0, resample_p=0, shift=0, gain=0, brightness=0)(
            clean, torch.Generator().manual_seed(1)),
        "vae": torch.cat([rec(clean[i:i + 200]).clamp(0, 1) for i in range(0, len(clean), 200)]),
    }
    out = {}
    root = Path(__file__).resolve().parents[1]
    for i, path in enumerate(args.judges):
        judge, row = load_judge(path), {}
        for name, x in versions.items():
            res = semantic_accuracy(judge.answer(x), annotations, judge_questions=judge.questions,
                                    parents="independent")
            weakest = sorted(res.questions, key=lambda q: q.accuracy)[:4]
            row[name] = {"acc_all": round(res.acc_all, 4), "weakest": {q.id: round(q.accuracy, 3) for q in weakest}}
        row["ratio"] = {k: round(row[k]["acc_all"] / row["clean"]["acc_all"], 4) for k in ("blur_noise", "vae")}
        row["trained"] = judge.cfg.info.get("command")
        row["shifts"] = [list(sh) for sh in judge.cfg.shifts]     # the readings averaged (JudgeConfig.shifts)
        where = Path(path).resolve()
        key = args.label[i] if args.label else str(where.relative_to(root) if where.is_relative_to(root) else path)
        out[key] = row
        print(key, json.dumps(row))
    result = {"benchmark": "judge_robustness", "device": f"cpu-{os.cpu_count()}core",
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
              "people": args.people, "seeds": [0, args.people - 1], "vae": "cosmiclite/assets/toy_model/vae",
              "world": world, "judges": out}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"judge_robustness-{result['device']}.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    result["earlier_worlds"] = earlier.get("earlier_worlds", [])
    if earlier.get("people") == args.people and earlier.get("world") == world:   # the same people, drawn alike
        result["judges"] = {**earlier.get("judges", {}), **out}
    elif earlier.get("judges"):                 # measured on other people, or before the toy world changed
        keys = ("people", "world", "command", "judges")
        result["earlier_worlds"].append({k: earlier[k] for k in keys if k in earlier})
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
