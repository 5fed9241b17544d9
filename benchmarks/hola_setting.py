"""One HOLA setting of the demo's fine-tune, measured as the demo measures (attention mass in masks, semantic
accuracy), optionally against the same fine-tune without HOLA on the same people, seeds and steps.

    python benchmarks/hola_setting.py NAME [--hola '{"beta": 0.1}'] [--steps 200] [--threads 2]
                                           [--eval-people 24] [--seed 0] [--judge J] [--baseline] [--out /tmp/hx]
                                           [--reuse] [--device cpu|cuda] [--full LR]

The HOLA run is the demo's (`demo.lora_config`, seed 0, beta = `DemoConfig.hola_beta`) with `--hola`'s keys
(any `hola:` keys of the config as JSON: beta, normalize, resolutions, ...) applied over it. `--baseline` also trains beta = 0 and reports the paired difference: Acc_all and
mean attention mass of HOLA minus noise-only, and a 95 % bootstrap interval (2,000 resamples of the held-out
people) for the difference in per-image accuracy. Prints one JSON line and writes OUT/NAME.json;
benchmarks/results/hola_setting-*.json and docs/results.md record the runs.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from cosmiclite.demo import DemoConfig, held_out_people, lora_config, measure
from cosmiclite.judge import load_judge
from cosmiclite.metrics import paired_difference
from cosmiclite.models import load_toy_pipeline
from cosmiclite.train import train

KEYS = ("acc_obj", "acc_tex", "acc_shape", "acc_all")


def run(name: str, hola: dict, cfg: DemoConfig, people, judge, out: Path, threads: int, reuse: bool = False,
        device: str = "cpu", full_lr: float | None = None) -> dict:
    """Fine-tune with these HOLA keys (or, with `reuse`, take the LoRA an earlier run left), then measure.

    full_lr: a full fine-tune of the UNet at this learning rate instead of the demo's LoRA (configs/toy_full.yaml's
    optimiser, no EMA), measured from the pipeline folder it writes."""
    c = lora_config(cfg, cfg.hola_beta, out / name)
    c["hola"].update(hola)
    c["run"]["threads"] = threads
    if full_lr is not None:
        c["lora"] = None
        c["optim"] = {"lr": full_lr, "lr_scheduler": "constant_with_warmup", "warmup_steps": 20}
    made = out / name / ("pipeline" if full_lr is not None else "lora")
    t0 = time.time()
    if not (reuse and made.exists()):
        train(c)
    t1 = time.time()
    # training picks its device itself (accelerate: CUDA when present)
    pipe = load_toy_pipeline(made if full_lr is not None else None).to(device)
    pipe.set_progress_bar_config(disable=True)
    if full_lr is None:
        pipe.load_lora_weights(str(made))
    m = measure(pipe, judge, people, cfg)
    a = m["alignment"]
    return {"name": name, "hola": c["hola"], "lora": c["lora"], "optim": c["optim"], "steps": cfg.steps,
            "mean_mass": a["mean_mass"], "mean_lift": a["mean_lift"],
            "lift": {g: round(v["lift"], 3) for g, v in a["by_group"].items()},
            "acc": {k: m["accuracy"][k] for k in KEYS}, "per_image": m["accuracy"]["per_image"],
            "train_seconds": round(t1 - t0), "measure_seconds": round(time.time() - t1)}


def paired(hola: dict, base: dict) -> dict:
    """HOLA minus noise-only on the same people: point differences and a bootstrap interval over people."""
    d = paired_difference(hola["per_image"], base["per_image"])
    return {"acc_all": hola["acc"]["acc_all"] - base["acc"]["acc_all"],
            "mean_mass": hola["mean_mass"] - base["mean_mass"],
            "per_image_acc": d["mean"], "per_image_acc_ci95": d["ci95"], "people": d["images"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--hola", default="{}", help="hola: keys as JSON, e.g. '{\"beta\": 0.1}'")
    ap.add_argument("--steps", type=int, default=DemoConfig.steps)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-people", type=int, default=DemoConfig.eval_people)
    ap.add_argument("--seed", type=int, default=DemoConfig.seed, help="the fine-tune's seed (data order, noise, "
                    "dropout) and the generation seed; another seed replicates a run (the held-out people stay)")
    ap.add_argument("--judge", default=None, help="judge weights to read the images with (default: the shipped one)")
    ap.add_argument("--baseline", action="store_true", help="also train beta = 0 and report the paired difference")
    ap.add_argument("--out", default="/tmp/hx")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the fine-tuned pipeline is measured (the judge reads the images on CPU)")
    ap.add_argument("--full", type=float, default=None, metavar="LR", help="a full fine-tune of the UNet at this "
                    "learning rate (e.g. 1e-4, configs/toy_full.yaml's) instead of the demo's LoRA")
    ap.add_argument("--reuse", action="store_true", help="measure the LoRAs an earlier run left in OUT (e.g. with a "
                    "new judge) instead of training them again")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DemoConfig(steps=args.steps, eval_people=args.eval_people, seed=args.seed)
    out = Path(args.out)
    people, judge = held_out_people(cfg.eval_people), load_judge(args.judge)
    result = {"name": args.name, "eval_people": cfg.eval_people, "seed": cfg.seed, "judge": args.judge or "shipped",
              "threads": args.threads, "device": args.device,
              "hola": run(args.name, json.loads(args.hola), cfg, people, judge, out, args.threads, args.reuse,
                          args.device, args.full)}
    if args.baseline:
        result["noise_only"] = run(f"{args.name}_noise_only", {"beta": 0.0}, cfg, people, judge, out, args.threads,
                                   args.reuse, args.device, args.full)
        result["difference"] = paired(result["hola"], result["noise_only"])
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    for r in (result["hola"], result.get("noise_only")):
        if r:
            r.pop("per_image")  # kept in the file (for pairing later runs), not on the screen
    print(json.dumps(result))


if __name__ == "__main__":
    main()
