"""One HOLA setting of the demo's fine-tune, with the demo's measures (attention mass in masks, semantic accuracy).

    python benchmarks/hola_setting.py NAME STEPS THREADS '{"beta": 0.1}'     # any `hola:` keys as JSON

Runs `demo.lora_config` (200 steps, seed 0) with those HOLA keys into /tmp/hx/NAME, then measures 24 held-out
people; prints one JSON line and writes /tmp/hx/NAME.json. README (Main job, Training) records the runs.
"""
import json, sys, time
import torch
from cosmiclite.demo import DemoConfig, lora_config, held_out_people
from cosmiclite.train import train
from cosmiclite.models import load_toy_pipeline
from cosmiclite.metrics import attention_alignment, generation_accuracy
from cosmiclite.judge import load_judge

name, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
over = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
torch.set_num_threads(threads)
cfg = DemoConfig(steps=steps)
c = lora_config(cfg, 1.0, f"/tmp/hx/{name}")
c["hola"].update(over)
c["run"]["threads"] = threads
t0 = time.time()
train(c)
pipe = load_toy_pipeline(); pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(f"/tmp/hx/{name}/lora")
people = held_out_people(24)
d = attention_alignment(pipe, people, seed=0).to_dict()
acc, _ = generation_accuracy(pipe, load_judge(), [p.annotation for p in people], cfg.gen_steps, cfg.guidance, cfg.seed)
out = {"name": name, "over": over, "steps": steps, "mean_mass": d["mean_mass"],
       "lift": {g: round(v["lift"], 3) for g, v in d["by_group"].items()},
       "mean_lift": sum(v["lift"] for v in d["by_group"].values()) / len(d["by_group"]),
       "acc": {k: getattr(acc, k) for k in ("acc_obj", "acc_tex", "acc_shape", "acc_all")},
       "seconds": round(time.time() - t0)}
print(json.dumps(out))
json.dump(out, open(f"/tmp/hx/{name}.json", "w"))
