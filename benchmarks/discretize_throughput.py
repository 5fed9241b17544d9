"""Throughput of discretization (Sec. 4.2) against bare batched CLIP tokenization, on one CPU core.

The question: does knowing each group's token span cost anything over what a training loop pays
anyway, tokenizing its captions? Three ways over the same captions, same run, same core:

  bare       tokenizer(texts, padding="max_length", truncation=True)  (what an SD pipeline does)
  composed   discretize_batch(captions)       composed captions: ids + exact spans from the phrase cache
  free_text  discretize_text_batch(texts)     the same captions as free text: lexicon + offsets

ratio = captions/s of a discretizer / captions/s of bare tokenization (>= 1.0 and >= 0.5 are the
targets set when it was written). `ratio` is steady state: the discretizer's caches (phrase ids, pre-token ids,
clause groups) are warmed on other captions of the same distribution, then each way runs `rounds`
passes over the same captions and the median pass counts, so from the second pass on the caches have
seen these captions (as in a training run, which sees its captions epoch after epoch). `ratio_cold` is
the other bound: a new Discretizer, empty caches, one pass over unseen captions. The rate of `compose`
itself (annotation -> Caption, paid once per sample either way) is reported too.

    python benchmarks/discretize_throughput.py [--quick] [--n 4000] [--rounds 5]
"""
import os

os.environ["RAYON_NUM_THREADS"] = "1"          # the tokenizers library's thread pool: one core
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import json
import platform
import random
import statistics
import time
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)

from cosmiclite.captions import compose, random_annotation  # noqa: E402
from cosmiclite.discretize import Discretizer, TruncationWarning  # noqa: E402
from cosmiclite.tokenizer import clip_tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def rates(fns: dict, items: dict, batch: int, rounds: int) -> dict:
    """Median items/s of each fn over `rounds` passes, the fns taking turns within each round.

    Taking turns means a burst of load from another process on this shared machine hits all of them
    alike, so their ratio holds even when the absolute figures wander.
    """
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            xs = items[k]
            t = time.perf_counter()
            for i in range(0, len(xs), batch):
                fn(xs[i:i + batch])
            times[k].append(time.perf_counter() - t)
    return {k: len(items[k]) / statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (1,000 captions, 3 rounds)")
    ap.add_argument("--n", type=int, default=4000, help="captions measured")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n, rounds = (1000, 3) if args.quick else (args.n, args.rounds)
    warnings.simplefilter("ignore", TruncationWarning)  # a few random captions run over 77 tokens

    rng = random.Random(args.seed)
    warm = [compose(random_annotation(rng)) for _ in range(n)]
    caps = [compose(random_annotation(rng)) for _ in range(n)]
    texts = [c.text for c in caps]
    tok = clip_tokenizer()

    def bare(batch):
        return tok(batch, padding="max_length", truncation=True, max_length=77)["input_ids"]

    d = Discretizer(tok)
    t = time.perf_counter()
    d.discretize_batch(caps[: n // 2])
    cold = (n // 2) / (time.perf_counter() - t)
    fresh = Discretizer(tok)
    t = time.perf_counter()
    fresh.discretize_text_batch(texts[: n // 2])
    free_cold = (n // 2) / (time.perf_counter() - t)
    d.discretize_batch(warm)  # steady state: phrases seen before
    d.discretize_text_batch([c.text for c in warm])
    bare(texts[:args.batch])  # warm-up
    figures = rates({"bare_tokenization": bare, "composed": d.discretize_batch, "free_text": d.discretize_text_batch},
                    {"bare_tokenization": texts, "composed": caps, "free_text": texts}, args.batch, rounds)
    anns = [random_annotation(rng) for _ in range(n // 2)]
    t = time.perf_counter()
    for a in anns:
        compose(a)
    compose_rate = len(anns) / (time.perf_counter() - t)
    ids = bare(texts)
    n_tokens = [sum(1 for x in row if x != tok.pad_token_id) + 1 for row in ids]
    result = {
        "benchmark": "discretize_throughput",
        "device": "cpu-2core",
        "threads": 1,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "ratio": {k: round(figures[k] / figures["bare_tokenization"], 3) for k in ("composed", "free_text")},
        "captions_per_s": {k: round(v, 1) for k, v in figures.items()},
        "ratio_cold": {"composed": round(cold / figures["bare_tokenization"], 3),
                       "free_text": round(free_cold / figures["bare_tokenization"], 3)},
        "composed_cold_captions_per_s": round(cold, 1),
        "free_text_cold_captions_per_s": round(free_cold, 1),
        "compose_captions_per_s": round(compose_rate, 1),
        "phrase_cache_size": len(d._ids),
        "captions": n, "rounds": rounds, "batch": args.batch, "quick": args.quick,
        "mean_tokens": round(statistics.mean(n_tokens), 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "discretize_throughput-cpu-2core.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
