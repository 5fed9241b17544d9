"""Cost of capturing decomposed cross-attention (Sec. 4.1 Eq. 2, Sec. 4.3) during inference.

Same UNet weights, same inputs, same timesteps, measured in one run: a denoising loop of `steps` UNet calls
on a classifier-free-guidance batch ([uncond, cond], batch 2) without capture, and the same loop inside
`capture_cross_attention(unet, "inference", guidance_batch=True, spans=...)` at its default resolutions (what
`generate_with_attention` does). The two variants run on twin copies of the UNet and alternate step by step
(which goes first flips every step), so load from other processes on the machine hits both alike.

    time ratio   = median over repetitions of (denoising time with capture / without)  (CPU <= 1.05, GPU <= 1.10)
                   On CPU with one thread, time is the thread's CPU time (time.thread_time): on a 2-core machine
                   shared with other jobs wall time swings 2-4x within seconds; wall_time_ratio is reported too.
    memory ratio = peak CUDA memory with capture / without (torch.cuda.max_memory_allocated), GPU only (<= 1.10)
    kept bytes   = bytes the capture holds after the loop (InferenceStore.nbytes), and what storing every
                   recorded map of one forward would take instead (B x heads x N x 77 x 4 bytes per layer)

Models (random weights; the cost does not depend on the values):
    toy            the kit's toy UNet (3.2 M params), 16x16 latents (64 px), maps at 8 and 16        CPU and GPU
    sd15-32        SD 1.5's UNet (860 M params), 32x32 latents (256 px), maps at 8 and 16            CPU and GPU
    sd15-512       SD 1.5's UNet at 64x64 latents (512 px), maps at 16 and 32, fp16                 GPU only

    python benchmarks/capture_overhead.py [--quick] [--threads 1] [--device cpu|cuda] [--models toy,sd15-32]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cosmiclite.attention import capture_cross_attention
from cosmiclite.models import architecture, build_unet

RESULTS = Path(__file__).parent / "results"
SPANS = [(1, 4), (4, 8), (8, 12), (12, 15), (15, 18), (18, 22)]  # six caption groups, as a toy caption has


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(arch: str, latent: int, steps: int, reps: int, device: torch.device, dtype) -> dict:
    unet = build_unet(arch).to(device, dtype).eval()
    cross = architecture(arch).unet["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
    c = torch.randn(2, 77, cross, generator=g).to(device, dtype)
    timesteps = torch.linspace(999, 1, steps).round().long().tolist()

    def run(capture: bool):
        with torch.no_grad():
            if not capture:
                for t in timesteps:
                    unet(x, t, c)
                _sync(device)
                return None
            with capture_cross_attention(unet, "inference", guidance_batch=True, spans=SPANS) as store:
                for t in timesteps:
                    unet(x, t, c)
            _sync(device)
            return store

    run(False), run(True)  # warm-up (allocator, kernels, lazy inits)
    out: dict = {}
    if device.type == "cuda":  # peak memory, one UNet resident, each variant twice
        peaks: dict = {}
        for capture in (False, True, False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run(capture)
            peaks.setdefault(capture, []).append(torch.cuda.max_memory_allocated())
        out["peak_bytes_base"], out["peak_bytes_capture"] = max(peaks[False]), max(peaks[True])
        out["memory_ratio"] = round(out["peak_bytes_capture"] / out["peak_bytes_base"], 4)
    store = run(True)
    with torch.no_grad(), capture_cross_attention(unet, "training", guidance_batch=True) as every:  # keeps every map
        unet(x, timesteps[0], c)
        full = sum(m.numel() * 4 for ms in every.maps().values() for m in ms)  # as fp32, one forward

    # Timing. Two identical UNets, one with the capture installed for the whole run, called alternately step
    # by step (the order flipping every step): both variants of a step see the same machine load, which on a
    # shared 2-core machine swings by 2-4x within seconds. One run = `steps` denoising steps of each.
    twin = copy.deepcopy(unet)
    # On CPU the clock is this thread's CPU time (time.thread_time, one torch thread): what the computation
    # costs, unaffected by the scheduler handing the cores to other jobs; wall time is reported beside it.
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    base_runs, cap_runs, step_ratios, wall = [], [], [], {False: 0.0, True: 0.0}
    for r in range(reps):
        tb = tc = 0.0
        with torch.no_grad(), capture_cross_attention(twin, "inference", guidance_batch=True, spans=SPANS):
            for i, t in enumerate(timesteps):
                pair = {}
                for captured in ((False, True) if (r + i) % 2 == 0 else (True, False)):
                    t0, w0 = clock(), time.perf_counter()
                    (twin if captured else unet)(x, t, c)
                    _sync(device)
                    pair[captured] = clock() - t0
                    wall[captured] += time.perf_counter() - w0
                tb, tc = tb + pair[False], tc + pair[True]
                step_ratios.append(pair[True] / pair[False])
        base_runs.append(tb)
        cap_runs.append(tc)
    run_ratios = [c_ / b_ for b_, c_ in zip(base_runs, cap_runs)]
    twin = unet = None
    out.update({
        "arch": arch, "latent": latent, "image_px": latent * architecture(arch).image_size
        // architecture(arch).unet["sample_size"], "resolutions": list(store.resolutions), "steps": steps,
        "reps": reps, "dtype": str(dtype).replace("torch.", ""),
        "time_ratio": round(statistics.median(run_ratios), 4),
        "time_ratio_of_medians": round(statistics.median(cap_runs) / statistics.median(base_runs), 4),
        "step_ratio_median": round(statistics.median(step_ratios), 4),
        "base_run_s_median": round(statistics.median(base_runs), 4),
        "capture_run_s_median": round(statistics.median(cap_runs), 4),
        "run_ratios": [round(v, 4) for v in run_ratios],
        "clock": clock.__name__, "wall_time_ratio": round(wall[True] / wall[False], 4),
        "kept_bytes_after_run": store.nbytes(),
        "kept_bytes_if_every_map_stored_per_forward": full})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run: fewer steps and repetitions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a 2-core machine shared with other jobs, 2 threads made a toy "
                         "forward 10x slower and 5x noisier, 1.7 s vs 0.16 s, from OpenMP threads waiting)")
    ap.add_argument("--models", default=None, help="comma list of toy,sd15-32,sd15-512 (default: all that fit)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        name = f"cpu-{os.cpu_count()}core"
    else:
        name = "cuda-" + torch.cuda.get_device_name(device).lower().replace("nvidia ", "").replace(" ", "-")
    plan = {  # model: (arch, latent, steps, reps, quick steps, quick reps, dtype)
        "toy": ("toy", 16, 25, 7, 25, 3, torch.float32),
        "sd15-32": ("sd15", 32, 10, 3, 5, 2, torch.float32),
    }
    if device.type == "cuda":
        plan["toy"] = ("toy", 16, 50, 9, 25, 7, torch.float32)
        plan["sd15-32"] = ("sd15", 32, 25, 7, 10, 5, torch.float16)
        plan["sd15-512"] = ("sd15", 64, 50, 7, 20, 5, torch.float16)
    chosen = args.models.split(",") if args.models else list(plan)
    rows = {}
    for key in chosen:
        if key not in plan:
            raise SystemExit(f"--models: {key!r} is not measured on {device.type}; choose from {list(plan)}")
        arch, latent, steps, reps, qsteps, qreps, dtype = plan[key]
        if args.quick:
            steps, reps = qsteps, qreps
        rows[key] = measure(arch, latent, steps, reps, device, dtype)
        print(json.dumps({key: {k: v for k, v in rows[key].items() if not k.endswith("_all_s")}}), flush=True)
    ratio = {f"{k}_time": r["time_ratio"] for k, r in rows.items()}
    ratio.update({f"{k}_memory": r["memory_ratio"] for k, r in rows.items() if "memory_ratio" in r})
    result = {"benchmark": "capture_overhead", "device": name, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
              "targets": {"cpu_time": 1.05, "cuda_time": 1.10, "cuda_memory": 1.10, "kept_bytes_per_forward": 2**20},
              "ratio": ratio, "quick": args.quick, "models": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"capture_overhead-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
