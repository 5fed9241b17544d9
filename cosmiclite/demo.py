"""The main job, `cosmiclite demo`: CosmicMan's whole story on the toy world, in minutes on a CPU.

    1. data (Sec. 3.2.2, 4.2)  toy people -> protocol answers -> captions -> groups with token spans -> mask sets H
    2. base model              the kit's toy model: where does each group's attention go? (Sec. 4.3)
    3. Daring (Eq. 4)          a short LoRA fine-tune twice, on the same data, seeds and steps:
                               with L_noise only (beta = 0), and with L_noise + L_HOLA (beta = 0.1)
    4. after                   attention mass inside the masks and semantic accuracy (Sec. 5.1) of each model
    5. report                  OUT/report.md (+ report.json) and the figures as PNG

Everything is measured on held-out people (toy-world seeds the fine-tune never draws): attention alignment on
their noised images with exact masks (`metrics.attention_alignment`), semantic accuracy on images generated
from their captions and read by the toy judge (`metrics.generation_accuracy`).

But: a few hundred LoRA steps on a 2-core CPU is a demonstration, not a study: one seed, small numbers. The
report states the sizes it ran with; run it longer (`--steps`, `--eval-people`) or on a GPU for firmer figures.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_SEED = 20_000_000   # first seed of the evaluation people: the toy model trains on 0…19,999, the judge on 10,000,000+


@dataclass
class DemoConfig:
    out: str = "demo_report"
    steps: int = 200            # LoRA optimizer steps per fine-tune
    batch_size: int = 16
    train_people: int = 1000    # distinct toy people the fine-tunes draw from
    eval_people: int = 24       # held-out people for both measures
    gen_steps: int = 20         # DDIM steps per generated image
    guidance: float = 5.0
    seed: int = 0
    lr: float = 1e-3
    rank: int = 8
    hola_beta: float = 0.1      # beta of the HOLA run (Eq. 4): at 16x16 lift 1.0 -> 1.5, Acc_all kept; beta 1: -6.6 (README)
    model: str | None = None    # a toy pipeline folder (default: the shipped toy model)


def lora_config(cfg: DemoConfig, beta: float, output: str | Path) -> dict:
    """The toy LoRA preset (configs/toy_lora.yaml) sized for the demo; beta = 0 turns HOLA off.

    HOLA compares max-normalised maps with the masks (`HolaConfig.normalize="max"`), not CosmicMan's raw
    softmax maps: on the toy model the raw maps let the body group (h_1, the whole person, the longest span)
    win every pixel of the person, and the outfit groups' attention moved *out* of their masks (see
    configs/toy_lora.yaml for the measurement).
    """
    return {
        "stage": "unet", "seed": cfg.seed, "output": str(output),
        "model": {"pretrained": cfg.model or "toy"},
        "data": {"source": "toy", "image_size": 64, "num_samples": cfg.train_people, "latent_pool": True,
                 "caption": {"shuffle_groups": True, "group_drop": 0.05, "uncond": 0.1}},
        "lora": {"rank": cfg.rank, "alpha": cfg.rank, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "hola": {"alpha": 1.0, "beta": beta, "resolutions": [16], "normalize": "max"},
        "optim": {"lr": cfg.lr, "lr_scheduler": "constant"},
        "run": {"batch_size": cfg.batch_size, "max_steps": cfg.steps, "checkpoint_every": cfg.steps,
                "log_every": 10},
    }


def read_log(path: str | Path) -> list[dict]:
    """A training run's log.csv as a list of rows (floats)."""
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def held_out_people(n: int) -> list:
    """n toy people neither the toy model, the judge nor a demo fine-tune ever trained on."""
    from . import toyworld
    return [toyworld.render(HELD_OUT_SEED + i) for i in range(n)]


def measure(pipe, judge, people, cfg: DemoConfig, name: str = "model") -> dict:
    """The demo's measures of one model (`pipe`, with whatever LoRA is loaded) on held-out `people`.

    {"alignment": attention mass in mask (metrics.attention_alignment), "accuracy": semantic accuracy of images
    generated from their captions (metrics.generation_accuracy), "images", "maps": the AttentionResult of the
    first person's caption (for `viz.plot_group_maps`)}.
    """
    from .attention import generate_with_attention
    from .captions import compose
    from .discretize import discretize
    from .metrics import attention_alignment, generation_accuracy

    annotations = [p.annotation for p in people]
    align = attention_alignment(pipe, people, seed=cfg.seed)
    acc, images = generation_accuracy(pipe, judge, annotations, cfg.gen_steps, cfg.guidance, cfg.seed)
    probe = discretize(compose(annotations[0]), tokenizer=pipe.tokenizer)
    maps = generate_with_attention(pipe, probe.caption, [(g.name, g.span) for g in probe.groups],
                                   steps=cfg.gen_steps, seed=cfg.seed, guidance_scale=cfg.guidance)
    return {"alignment": align.to_dict(), "matrix": align.matrix(max(align.resolutions)), "accuracy": acc.to_dict(),
            "images": images, "maps": maps}


def fine_tune(cfg: DemoConfig, beta: float, output: str | Path) -> Path:
    """One short LoRA fine-tune of the toy model (Eq. 4 with alpha = 1 and this beta); returns its run folder."""
    import shutil

    from .train import train
    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    train(lora_config(cfg, beta, output))
    return output


def run_demo(cfg: DemoConfig | None = None, **kw) -> dict:
    """Run the whole story and write the report folder; returns the numbers of report.json."""
    import matplotlib
    matplotlib.use("Agg")
    import torch
    from tqdm.auto import tqdm

    from . import toyworld, viz
    from .captions import compose
    from .discretize import discretize
    from .judge import load_judge
    from .masks import mask_set, plot_mask_set
    from .metrics import paired_difference
    from .models import load_pipeline, load_toy_pipeline

    cfg = cfg or DemoConfig(**kw)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = tqdm(total=6, desc="demo")
    torch.manual_seed(cfg.seed)

    # 1. data: people, captions, spans, mask sets (Sec. 4.2)
    toyworld.contact_sheet(range(8), out / "01_toy_people.png", columns=8)
    person = toyworld.render(3)
    _finish(plot_mask_set(person.image, mask_set(person.parsing), discretize(compose(person.annotation))),
            out / "02_mask_set.png")
    people = held_out_people(cfg.eval_people)
    stages.update()

    # 2. the base model
    pipe = load_pipeline(cfg.model, torch_dtype=torch.float32) if cfg.model else load_toy_pipeline()
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge()
    results = {"base": measure(pipe, judge, people, cfg)}
    stages.update()

    # 3. Daring: the same LoRA fine-tune without and with HOLA
    runs = {}
    for name, beta in (("lora_noise_only", 0.0), ("lora_hola", cfg.hola_beta)):
        runs[name] = fine_tune(cfg, beta, out / "runs" / name)
        stages.update()

    # 4. the same measures after each fine-tune
    for name, run_dir in runs.items():
        pipe.load_lora_weights(str(run_dir / "lora"))
        results[name] = measure(pipe, judge, people, cfg)
        pipe.unload_lora_weights()
    stages.update()

    # 5. report
    for name, r in results.items():
        _finish(viz.plot_group_maps(r["maps"], title=f"{name}: group maps of a held-out caption"),
                out / f"attention_{name}.png")
    plot_losses(runs, out / "03_losses.png")
    plot_alignment(results, out / "04_alignment.png")
    plot_part_matrices(results, out / "04_part_matrix.png")
    plot_accuracy(results, out / "05_accuracy.png")
    plot_samples(results, [p.annotation for p in people], out / "06_samples.png")
    summary = {
        "config": cfg.__dict__, "seconds": round(time.perf_counter() - t0, 1),
        "held_out_seeds": [HELD_OUT_SEED, HELD_OUT_SEED + cfg.eval_people - 1],
        "models": {n: {"alignment": r["alignment"], "accuracy": {k: r["accuracy"][k] for k in
                                                                 ("acc_obj", "acc_tex", "acc_shape", "acc_all")}}
                   for n, r in results.items()},
        "chance": results["base"]["accuracy"]["chance"],
        "hola_minus_noise_only": paired_difference(results["lora_hola"]["accuracy"]["per_image"],
                                                   results["lora_noise_only"]["accuracy"]["per_image"]),
        "final_losses": {n: read_log(r / "log.csv")[-1] for n, r in runs.items()},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "report.md").write_text(_markdown(summary, results))
    stages.update()
    stages.close()
    return summary


# ------------------------------------------------------------------------------------------------- figures

def _finish(fig, path):
    """Lay out; when a path is given, save the figure there and close it (scripts), else return it (notebooks)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None

def plot_losses(runs: dict, path: str | Path | None = None):
    """L_noise and L_HOLA of each run ({name: run folder}) against the step."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for name, run_dir in runs.items():
        log = read_log(run_dir / "log.csv")
        steps = [r["step"] for r in log]
        axes[0].plot(steps, [r["noise_loss"] for r in log], label=name)
        if "hola_loss" in log[0]:
            axes[1].plot(steps, [r["hola_loss"] for r in log], label=name)
    axes[0].set_title("L_noise"), axes[1].set_title("L_HOLA (Eq. 3)")
    for ax in axes:
        ax.set_xlabel("step"), ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_alignment(results: dict, path: str | Path | None = None):
    """Attention mass in mask per group for each model ({name: {"alignment": Alignment.to_dict()}})."""
    import matplotlib.pyplot as plt
    import numpy as np
    groups = list(results["base"]["alignment"]["by_group"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) + 2), 3.2))
    w = 0.8 / len(results)
    for k, (name, r) in enumerate(results.items()):
        bg = r["alignment"]["by_group"]
        ax.bar(np.arange(len(groups)) + k * w, [bg[g]["mass"] for g in groups], w, label=name)
    area = [results["base"]["alignment"]["by_group"][g]["area"] for g in groups]
    ax.scatter(np.arange(len(groups)) + 0.4 - w / 2, area, marker="_", s=300, c="k", label="mask area (uniform map)")
    ax.set_xticks(np.arange(len(groups)) + 0.4 - w / 2, groups, fontsize=8)
    ax.set_ylabel("attention mass in mask")
    ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_part_matrices(results: dict, path: str | Path | None = None):
    """The group x part matrix of each model side by side ({name: {"matrix": Alignment.matrix()}})."""
    import matplotlib.pyplot as plt

    from .viz import plot_part_matrix
    n_parts = max(len(r["matrix"][1]) for r in results.values())
    fig, axes = plt.subplots(1, len(results), figsize=(len(results) * (0.36 * n_parts + 1.6), 0.36 * n_parts + 1.6))
    for ax, (name, r) in zip(list(getattr(axes, "flat", [axes])), results.items()):
        a = r["alignment"]
        plot_part_matrix(r["matrix"], ax=ax,
                         title=f"{name}: specificity {a['specificity_finest']:.2f} ({a['finest']}x{a['finest']})")
    return _finish(fig, path)


def plot_accuracy(results: dict, path: str | Path | None = None):
    """Acc_obj/tex/shape/all for each model ({name: {"accuracy": SemanticAccuracy.to_dict()}})."""
    import matplotlib.pyplot as plt
    import numpy as np
    keys = ("acc_obj", "acc_tex", "acc_shape", "acc_all")
    fig, ax = plt.subplots(figsize=(6, 3))
    w = 0.8 / len(results)
    for k, (name, r) in enumerate(results.items()):
        ax.bar(np.arange(4) + k * w, [r["accuracy"][x] for x in keys], w, label=name)
    ax.set_xticks(np.arange(4) + 0.4 - w / 2, keys)
    ax.set_ylabel("semantic accuracy (judge)")
    ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_samples(results: dict, annotations, path: str | Path | None = None, n: int = 8):
    """The first n generated images of each model, titled with their captions."""
    import matplotlib.pyplot as plt

    from .captions import compose
    n = min(n, min(len(r["images"]) for r in results.values()))
    fig, axes = plt.subplots(len(results), n, figsize=(1.4 * n, 1.6 * len(results)), squeeze=False)
    for r, (name, res) in enumerate(results.items()):
        for c in range(n):
            axes[r, c].imshow(res["images"][c])
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7)
    for c in range(n):
        axes[0, c].set_title(compose(annotations[c]).text[:40], fontsize=5)
    return _finish(fig, path)


def _resolutions(results: dict) -> list:
    return sorted(results["base"]["alignment"]["specificity_by_res"], key=int, reverse=True)


def _markdown(summary: dict, results: dict) -> str:
    cfg = summary["config"]
    lines = [
        "# cosmiclite demo report", "",
        f"Toy model, LoRA rank {cfg['rank']}, {cfg['steps']} steps at batch {cfg['batch_size']} on "
        f"{cfg['train_people']} toy people; measured on {cfg['eval_people']} held-out people (toy-world seeds "
        f"{summary['held_out_seeds'][0]}–{summary['held_out_seeds'][1]}); seed {cfg['seed']}; "
        f"{summary['seconds']} s in all.", "",
        "![toy people](01_toy_people.png)", "", "![mask set](02_mask_set.png)", "",
        "## Where attention goes (Sec. 4.3)", "",
        "**Part specificity**: each caption group's map density inside its own part's mask over its density inside "
        "the person's other parts (geometric mean over the outfit groups). 1 = a silhouette or a uniform map; "
        "far above 1 = each group's attention on its own part. Held-out people's noised images (t = 250, 500, "
        "750), mean over heads and layers.", "",
        "| model | specificity " + " | ".join(f"{r}x{r}" for r in _resolutions(results)) + " | lift (person vs "
        "background) |", "|---|" + "---|" * (len(_resolutions(results)) + 1),
    ]
    for name, r in results.items():
        a = r["alignment"]
        lines.append(f"| {name} | " + " | ".join(f"**{a['specificity_by_res'][res]:.2f}**" for res in
                                                   _resolutions(results)) + f" | {a['mean_lift']:.2f} |")
    lines += ["", "The group x part matrix: each group's map density in every part's mask over its density on the "
              "whole person (finest maps). A silhouette is all ones; decomposed attention a red diagonal.", "",
              "![part matrix](04_part_matrix.png)", "",
              "Attention mass inside each group's mask h_i (a uniform map scores the mask's area). Mass and lift "
              "rise when attention moves from the background onto the person, whichever part it lands on.", "",
              "| group | mask area | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    groups = list(results["base"]["alignment"]["by_group"])
    for g in groups:
        area = results["base"]["alignment"]["by_group"][g]["area"]
        lines.append(f"| {g} | {area:.3f} | " + " | ".join(
            f"{r['alignment']['by_group'].get(g, {}).get('mass', float('nan')):.3f}" for r in results.values()) + " |")
    lines.append("| **mean over groups** | | " + " | ".join(
        f"**{r['alignment']['mean_mass']:.3f}**" for r in results.values()) + " |")
    lines += ["", "![alignment](04_alignment.png)", "", "## Semantic accuracy (Sec. 5.1)", "",
              "Images generated from the held-out captions, read by the toy judge (its own held-out accuracy "
              "on clean toy renders is in cosmiclite/assets/judge.json: the judge's errors count against every "
              "model alike).", "",
              "| model | Acc_obj | Acc_tex | Acc_shape | Acc_all |", "|---|---|---|---|---|"]
    for name, r in results.items():
        a = r["accuracy"]
        lines.append(f"| {name} | " + " | ".join(f"{100 * a[k]:.1f}" for k in
                                                   ("acc_obj", "acc_tex", "acc_shape", "acc_all")) + " |")
    c = results["base"]["accuracy"]["chance"]
    lines.append("| chance (uniform guess) | " + " | ".join(f"{100 * c[k]:.1f}" for k in
                                                            ("object", "texture", "shape", "all")) + " |")
    d = summary["hola_minus_noise_only"]
    lo, hi = d["ci95"]
    lines += ["", f"Per-image accuracy, HOLA minus noise only (same captions and seeds): {100 * d['mean']:+.1f} points, "
              f"95 % bootstrap interval {100 * lo:+.1f} to {100 * hi:+.1f} over {d['images']} people"
              + (": the two cannot be told apart at this size (README records 320-person runs)." if lo < 0 < hi
                 else "."),
              "", "![accuracy](05_accuracy.png)", "", "![samples](06_samples.png)", "",
              "## Training (Eq. 4)", "", "![losses](03_losses.png)", ""]
    for name, row in summary["final_losses"].items():
        lines.append(f"- {name}: last logged step {int(row['step'])}: " +
                     ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith("loss")))
    lines += ["", "Attention maps of one held-out caption, per model:", ""]
    lines += [f"![attention {n}](attention_{n}.png)" for n in results]
    return "\n".join(lines) + "\n"
