"""Peak memory and step time of the full fine-tune under each accelerate config, measured.

CUDA (the acceptance run): the SD 1.5-sized UNet (cosmiclite.models "sd15", random weights; text encoder and VAE
frozen) trains `--steps` optimizer steps with HOLA at 512 px, batch 1, bf16, gradient checkpointing, launched by
`accelerate launch --num_processes 1` with each shipped config: single_gpu (the baseline), multi_gpu (DDP),
deepspeed_zero2 (skipped with a note where deepspeed is not installed) and fsdp. Per config: this process's peak
`torch.cuda.max_memory_allocated` and the median s/step after the first step (from log.csv), and the ratios to
single_gpu. On one GPU ZeRO-2 and FSDP cannot shard anything: the figures show that the configs run and what
their machinery costs; the savings come with N GPUs (docs/results.md, Scaling out: the computed table).

    python benchmarks/distributed_memory.py [--steps 6]

CPU (`--quick`, or no GPU): the toy UNet (random weights, 64 px, HOLA) trained for a few steps by 1 process x batch
2B and by 2 processes x batch B (torchrun, gloo, DistributedType.MULTI_CPU): the same samples per step, so
ratio = s/step(2 processes) / s/step(1 process). On a 2-core machine two processes share the cores: this measures
the cost of the process group and DDP's gradient all-reduce, not a speed-up.

    python benchmarks/distributed_memory.py --quick

Prints one JSON object as the last line and writes benchmarks/results/distributed_memory-<device>.json.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CONFIGS = ("single_gpu", "multi_gpu", "deepspeed_zero2", "fsdp")


def config(arch: str, size: int, batch: int, steps: int, out: Path, mixed: str, gc: bool) -> dict:
    return {"stage": "unet", "seed": 0, "output": str(out),
            "model": {"arch": arch, "pretrained": None, "init_seed": 0},
            "data": {"source": "toy", "image_size": size, "num_samples": 64},
            "lora": None,
            "hola": {"alpha": 1.0, "beta": 1.0, "resolutions": "1/16" if size >= 256 else [8, 16]},
            "optim": {"lr": 1e-5},
            "run": {"batch_size": batch, "max_steps": steps, "checkpoint_every": 10 ** 6, "log_every": 1,
                    "mixed_precision": mixed, "gradient_checkpointing": gc}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r


def figures(out: Path) -> dict:
    """Median s/step after the first step, and the last logged peak memory (GiB), from the run's log.csv."""
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    s = [float(r["s_per_step"]) for r in rows[1:]] or [float(rows[0]["s_per_step"])]
    res = {"s_per_step": round(statistics.median(s), 4), "steps": len(rows), "final_loss": float(rows[-1]["loss"])}
    if "peak_mem_gib" in rows[-1]:
        res["peak_mem_gib"] = float(rows[-1]["peak_mem_gib"])
    return res


def cuda_run(steps: int) -> dict:
    env = {**os.environ}
    have_ds = importlib.util.find_spec("deepspeed") is not None
    runs, notes = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "sd15_bench.yaml"
        cfg_file.write_text(yaml.safe_dump(config("sd15", 512, 1, steps, Path(tmp) / "unused", "bf16", True)))
        for name in CONFIGS:
            if name == "deepspeed_zero2" and not have_ds:
                notes.append("deepspeed_zero2 skipped: deepspeed is not installed (pip install deepspeed)")
                continue
            out = Path(tmp) / name
            launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / f"{name}.yaml"), "--num_processes", "1",
                    "--main_process_port", str(free_port()), "-m", "cosmiclite.train", "--config", str(cfg_file),
                    "--output", str(out)], env)
            runs[name] = figures(out)
            print(name, runs[name], flush=True)
    base = runs["single_gpu"]
    ratio = {n: {"step_time": round(r["s_per_step"] / base["s_per_step"], 3),
                 "peak_memory": round(r["peak_mem_gib"] / base["peak_mem_gib"], 3)}
             for n, r in runs.items() if n != "single_gpu"}
    return {"model": "sd15 UNet (random weights), 512 px, batch 1, bf16, gradient checkpointing, HOLA",
            "gpu": torch.cuda.get_device_name(0), "runs": runs, "ratio": ratio, "notes": notes}


def cpu_run(steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "toy_bench.yaml"
        cfg = config("toy", 64, 8, steps, Path(tmp) / "unused", "no", False)
        cfg["run"]["threads"] = 1
        cfg_file.write_text(yaml.safe_dump(cfg))
        train = ["-m", "cosmiclite.train", "--config", str(cfg_file)]
        launch([sys.executable, *train, "--output", str(Path(tmp) / "one")], env)
        runs["1 process x batch 8"] = figures(Path(tmp) / "one")
        launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), *train, "--output", str(Path(tmp) / "two"),
                "--set", "run.batch_size=4"], env)
        runs["2 processes x batch 4"] = figures(Path(tmp) / "two")
    one, two = runs["1 process x batch 8"], runs["2 processes x batch 4"]
    return {"model": "toy UNet (random weights), 64 px, HOLA, fp32, one thread per process",
            "runs": runs, "ratio": {"step_time_2proc_over_1proc": round(two["s_per_step"] / one["s_per_step"], 3)},
            "same_final_loss": abs(one["final_loss"] - two["final_loss"]) < 1e-4 * max(1.0, abs(one["final_loss"])),
            "notes": ["no GPU: the ZeRO-2 / FSDP acceptance run needs CUDA (run this script without --quick there)"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CPU smoke run (2 processes vs 1) even with a GPU")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 6 CUDA, 5 CPU)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    if torch.cuda.is_available() and not args.quick:
        result, device = cuda_run(args.steps or 6), "cuda-" + torch.cuda.get_device_name(0).replace(" ", "_")
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: running the CPU smoke of 2-process data parallelism (toy UNet); the ZeRO-2 / "
                  "FSDP memory runs need a CUDA machine", file=sys.stderr)
        result, device = cpu_run(args.steps or 5), f"cpu-{os.cpu_count()}core"
    result.update({"device": device, "torch": torch.__version__, "python": platform.python_version(),
                   "load_avg_1min_before": round(load_before, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2),
                   "wall_s": round(time.perf_counter() - start, 1)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"distributed_memory-{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
