"""Throughput of the toy world (Sec. 3.3 stand-in) and of mask-set building (Sec. 4.2), on one core.

    people_per_s = toyworld.render(seed) calls per second at 64x64 (image + ATR parsing map + validated
                   annotation), over fresh seeds; target >= 1,000
    maps_per_s   = masks.mask_set(parsing, "atr", sizes=(8, 16, 32)) calls per second on 64x64 toy maps;
                   target >= 2,000
    ratio        = {"people": people_per_s / 1000, "maps": maps_per_s / 2000}  (>= 1 meets the target)

Each figure is the median of `rounds` timed rounds (the machine is shared: the median resists bursts of
load from other processes); torch is held to one thread and the work is single-threaded Python/numpy,
so it uses one core. Other processes on the machine slow it down: the 1-minute load average before and
after the run is recorded beside the figures (on a 2-core machine, a load above 2 means less than
one free core). Also reported: people/s at 128x128 and 256x256, and the load average during the run.

    python benchmarks/toyworld_throughput.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cosmiclite.masks import mask_set
from cosmiclite.toyworld import render

RESULTS = Path(__file__).parent / "results"


def rate(fn, items, rounds: int) -> float:
    """Median calls per second of fn over `items`, in `rounds` rounds."""
    fn(items[0])  # warm caches (protocol, look-up tables)
    per_round = []
    for _ in range(rounds):
        t = time.perf_counter()
        for it in items:
            fn(it)
        per_round.append(len(items) / (time.perf_counter() - t))
    return statistics.median(per_round)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer people and rounds (a few seconds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, rounds = (500, 3) if args.quick else (3000, 5)
    load_before = os.getloadavg()[0]
    people = rate(lambda s: render(s, 64), list(range(10_000, 10_000 + n)), rounds)
    maps_in = [render(s, 64).parsing for s in range(n)]
    maps = rate(lambda p: mask_set(p, "atr", (8, 16, 32)), maps_in, rounds)
    big = {size: round(rate(lambda s: render(s, size), list(range(20_000, 20_000 + n // 5)), rounds), 1)
           for size in (128, 256)}
    result = {
        "benchmark": "toyworld_throughput",
        "device": "cpu-2core",
        "threads": 1,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "ratio": {"people": round(people / 1000, 3), "maps": round(maps / 2000, 3)},
        "people_per_s": round(people, 1),
        "maps_per_s": round(maps, 1),
        "people_per_s_by_size": {"64": round(people, 1), **{str(k): v for k, v in big.items()}},
        "targets": {"people_per_s": 1000, "maps_per_s": 2000},
        "people": n, "rounds": rounds, "quick": args.quick,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "toyworld_throughput-cpu-2core.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
