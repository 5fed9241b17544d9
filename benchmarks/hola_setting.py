"""One HOLA setting of the demo's fine-tune, with the demo's measures (attention mass in masks, semantic accuracy).

    python benchmarks/hola_setting.py NAME STEPS THREADS '{"beta": 0.1}'     # any `hola:` keys as JSON

Runs `demo.lora_config` (seed 0) with those HOLA keys into /tmp/hx/NAME, then `demo.measure` on 24 held-out
people; prints one JSON line and writes /tmp/hx/NAME.json. README (Main job, Training) records the runs.
"""
import json
import sys
import time
from pathlib import Path

import torch

from cosmiclite.demo import DemoConfig, held_out_people, lora_config, measure
from cosmiclite.judge import load_judge
from cosmiclite.models import load_toy_pipeline
from cosmiclite.train import train

name, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
over = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
torch.set_num_threads(threads)
cfg = DemoConfig(steps=steps)
run = Path("/tmp/hx") / name
c = lora_config(cfg, 1.0, run)
c["hola"].update(over)
c["run"]["threads"] = threads
t0 = time.time()
train(c)
pipe = load_toy_pipeline()
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(str(run / "lora"))
m = measure(pipe, load_judge(), held_out_people(cfg.eval_people), cfg)
a = m["alignment"]
out = {"name": name, "over": over, "steps": steps, "mean_mass": a["mean_mass"], "mean_lift": a["mean_lift"],
       "lift": {g: round(v["lift"], 3) for g, v in a["by_group"].items()},
       "acc": {k: m["accuracy"][k] for k in ("acc_obj", "acc_tex", "acc_shape", "acc_all")},
       "seconds": round(time.time() - t0)}
print(json.dumps(out))
(run.parent / f"{name}.json").write_text(json.dumps(out))
