"""The `cosmiclite` command line: one subcommand per concept of the kit.

    cosmiclite protocol [--json]                 the label protocol (Sec. 3.2.2)
    cosmiclite caption ANNOTATION.json [--json]  caption, groups, phrases, token spans and ids (Sec. 4.2)
    cosmiclite discretize "free text" [--json]   the same for a free-form caption
    cosmiclite train-judge [--steps N] [--out PATH]  train the toy attribute judge, record its accuracy (Sec. 5.1)
    cosmiclite toyworld --n N --out DIR [--size 64] [--seed S]   toy people as an imagefolder dataset (Sec. 3.3)
    cosmiclite dataset-card DIR [--json]         Table-1-style statistics and a bar chart
    cosmiclite generate --prompt TEXT | --annotation FILE --out IMG.png [--attention OUT.safetensors]
                                                 an image and its cross-attention maps (Sec. 4.1, 4.3)
    cosmiclite train --config FILE               Daring training (Eq. 4), LoRA or full; the toy base model
    cosmiclite export-lora DIR --out FILE        a trained LoRA in kohya's format
    cosmiclite export-pipeline RUN --out DIR     a full fine-tune's checkpoint as a pipeline folder
    cosmiclite demo [--out DIR]                  the main job: the whole story on the toy world, with a report

`--json` prints the machine-readable contract (documented in README.md); without it the output is for
people. Bad input (a missing file, an invalid annotation) prints one clear message and exits with
status 2, never a traceback.

Adding a subcommand: write one `cmd_NAME(args) -> int` that imports its module inside the function
(so that `cosmiclite protocol` stays fast), and one `add_parser` block in `build_parser`.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# --- protocol --------------------------------------------------------------------------------------------
def cmd_protocol(args) -> int:
    from .protocol import load_protocol

    p = load_protocol()
    if args.json:
        _print_json(p.to_dict())
        return 0
    print(f"{len(p.parts)} parts (ATR labels), {len(p.questions)} questions; every question also accepts "
          f"{' / '.join(repr(a) for a in p.special_answers)}.\n")
    for part in p.parts:
        qs = p.questions_of(part=part.id)
        print(f"{part.atr_label:>2} {part.name} [{part.id}], {len(qs)} questions")
        for q in qs:
            req = "".join(f"  (if {d} = {v})" for d, v in q.requires)
            print(f"     {q.id:<17} {q.kind:<8} group {q.group:<8} {q.text}{req}")
            print(f"     {'':<17} {'':<8} {'':<14} answers: {', '.join(q.answers)}")
    print("\ncaption groups (Sec. 4.2), in caption order:")
    for g in p.groups:
        labels = ", ".join(map(str, g.atr_labels)) or "no mask"
        print(f"  {g.name:<8} {g.level:<7} ATR {labels}")
    return 0


# --- caption / discretize --------------------------------------------------------------------------------
def _show(d, title: str) -> None:
    """A Discretized, for people: the caption, then one line per group with its span and tokens."""
    from .tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    print(f"{title}: {d.caption}")
    n_real = min(d.n_tokens, len(d.input_ids))
    print(f"tokens: {d.n_tokens} of {len(d.input_ids)} (start and end tokens counted)")
    print(f"{'group':<9} {'span':<10} phrases  ->  tokens")
    for g in d.groups:
        s, e = g.span
        words = " ".join(t.replace("</w>", "") for t in tok.convert_ids_to_tokens(list(d.input_ids[s:e])))
        print(f"{g.name:<9} [{s:>2}, {e:>2})  {' | '.join(g.phrases)}  ->  {words}")
    if d.lost_groups:
        print(f"lost to truncation (no span): {', '.join(d.lost_groups)}")
    print(f"input_ids ({n_real} real): {' '.join(map(str, d.input_ids[:n_real]))}")


def cmd_caption(args) -> int:
    from .captions import compose
    from .discretize import TruncationWarning, discretize
    from .protocol import Annotation

    caption = compose(Annotation.load(args.annotation), drop=args.drop or ())
    with warnings.catch_warnings():  # lost groups are part of the output below
        warnings.simplefilter("ignore", TruncationWarning)
        d = discretize(caption)
    if args.json:
        _print_json({**d.to_dict(), "phrases": caption.to_dict()["phrases"]})
    else:
        _show(d, "caption")
    return 0


def cmd_discretize(args) -> int:
    from .discretize import TruncationWarning, discretize_text

    text = sys.stdin.read().strip() if args.text == ["-"] else " ".join(args.text)
    with warnings.catch_warnings():  # lost groups are part of the output below
        warnings.simplefilter("ignore", TruncationWarning)
        d = discretize_text(text)
    if args.json:
        _print_json(d.to_dict())
    else:
        _show(d, "text")
    return 0


# --- generate --------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    """Generate one image with the toy model (or --model) and, when asked, save its cross-attention maps.

    The attention file (safetensors) holds, T = steps with --per-step else 1 (mean over steps), maps averaged
    over heads and layers at each resolution r (the map's side in latent cells):
        group/<name>/res<r>  (T, r, r) float32   group map m_(s_i,e_i) of each caption group (Sec. 4.3)
        tokens/res<r>        (T, n, r, r) float32  per-token maps of tokens 0..n-1 (start..end), with --per-token
        timesteps            (T,) float32        the step's timestep (their mean without --per-step)
        image                (H, W, 3) uint8
    and, in its metadata, "prompt", "tokens" (JSON list), "groups" (JSON [[name, [s, e]], ...]), "meta".
    Read it with cosmiclite.attention.AttentionResult.load(path).
    """
    from pathlib import Path

    from PIL import Image

    from . import attention, models, viz
    from .discretize import TruncationWarning, discretize, discretize_text

    if args.quiet:
        import diffusers
        import transformers
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if args.model:
        pipe = models.load_pipeline(args.model, unet=args.unet)
    else:
        pipe = models.load_toy_pipeline()
    pipe.set_progress_bar_config(disable=args.quiet)
    if args.lora:
        if not Path(args.lora).exists():
            raise FileNotFoundError(f"--lora {args.lora}: no such file or folder (a LoRA saved with "
                                    f"save_lora_weights, e.g. by cosmiclite's training)")
        pipe.load_lora_weights(args.lora)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        if args.annotation:
            from .captions import compose
            from .protocol import Annotation
            d = discretize(compose(Annotation.load(args.annotation)), tokenizer=pipe.tokenizer)
        else:
            d = discretize_text(args.prompt, tokenizer=pipe.tokenizer)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    result = attention.generate_with_attention(
        pipe, d.caption, [(g.name, g.span) for g in d.groups], steps=args.steps, seed=args.seed,
        guidance_scale=args.guidance, per_step=args.per_step)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.image).save(out)
    print(f"image: {out}  ({result.image.shape[1]}x{result.image.shape[0]}, {args.steps} steps, seed {args.seed})")
    print(f"caption: {d.caption}")
    for name, (s, e) in result.groups:
        print(f"  {name:<9} tokens [{s:>2}, {e:>2})")
    if args.attention:
        path = result.save(args.attention, per_token=args.per_token)
        print(f"attention maps: {path}  (resolutions {result.resolutions}; names group/<name>/res<r>"
              f"{', tokens/res<r>' if args.per_token else ''})")
    if args.attention_png:
        png = Path(args.attention_png)
        if result.groups:
            viz.save_figure(viz.plot_group_maps(result), png)
            print(f"group maps: {png}")
        if args.per_token or not result.groups:
            tok_png = png.with_name(png.stem + "-tokens.png") if result.groups else png
            viz.save_figure(viz.plot_token_maps(result), tok_png)
            print(f"token maps: {tok_png}")
    return 0


# --- train-judge -----------------------------------------------------------------------------------------
def cmd_train_judge(args) -> int:
    """Train the toy world's attribute judge (Sec. 5.1) and record its held-out accuracy."""
    from .judge import JUDGE_WEIGHTS
    from .judge_train import Augment, JudgeTrainConfig, train_judge, vae_reconstructor

    cfg = JudgeTrainConfig(steps=args.steps, batch=args.batch, pool=args.pool, threads=args.threads,
                      seed=args.seed, eval_seeds=args.eval_seeds, lr=args.lr, init=args.init,
                      vae_pool=args.vae_pool, parse_stride=args.parse_stride, fine_blocks=args.fine_blocks,
                      device=args.device, workers=args.workers)
    augment = Augment(vae_p=args.vae_p)
    if args.vae:
        from diffusers import AutoencoderKL
        augment.vae = vae_reconstructor(AutoencoderKL.from_pretrained(args.vae).to(args.device))
    out = args.out or JUDGE_WEIGHTS
    command = (f"cosmiclite train-judge --steps {cfg.steps} --batch {cfg.batch} --pool {cfg.pool} "
               f"--eval-seeds {cfg.eval_seeds} --threads {cfg.threads} --seed {cfg.seed}"
               + f" --lr {cfg.lr}" + (f" --init {args.init}" if args.init else "")
               + (f" --vae {args.vae} --vae-pool {cfg.vae_pool} --vae-p {augment.vae_p}" if args.vae else "")
               + (f" --parse-stride {cfg.parse_stride}" if cfg.parse_stride != 4 else "")
               + (f" --fine-blocks {cfg.fine_blocks}" if cfg.fine_blocks else "")
               + (f" --device {cfg.device}" if cfg.device != "cpu" else "")
               + (f" --workers {cfg.workers}" if cfg.workers != 1 else "")
               + (f" --out {args.out}" if args.out else ""))
    _, info = train_judge(cfg, augment, out=out, command=command)
    h = info["heldout"]
    print(f"held-out clean renders (seeds {info['heldout_seeds'][0]}..{info['heldout_seeds'][1] - 1}): "
          f"Acc_obj {h['acc_obj']:.3f}  Acc_tex {h['acc_tex']:.3f}  Acc_shape {h['acc_shape']:.3f}  "
          f"Acc_all {h['acc_all']:.3f}; lowest question {h['min_question']:.3f}")
    for q, a in sorted(h["per_question"].items(), key=lambda kv: kv[1])[:8]:
        print(f"  {q:<18} {a:.3f}  (majority-answer chance {h['chance_majority'][q]:.3f})")
    print(f"trained in {info['train_seconds']:.0f} s; wrote {out} and its .json beside it")
    return 0


# --- toyworld / dataset-card -----------------------------------------------------------------------------
def cmd_toyworld(args) -> int:
    """Render toy people and write them as a Hugging Face imagefolder dataset (Sec. 3.3)."""
    from .data import write_toyworld

    out = write_toyworld(args.n, args.out, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.n} people ({args.size}x{args.size}, seeds {args.seed}..{args.seed + args.n - 1}) to {out}; "
          f"open with datasets.load_dataset('imagefolder', data_dir='{out}')")
    return 0


def cmd_dataset_card(args) -> int:
    """Table-1-style statistics of an imagefolder dataset, and a bar chart."""
    from .data import dataset_card, plot_dataset_card

    card = dataset_card(args.dir)
    png = plot_dataset_card(card, args.chart or f"{args.dir.rstrip('/')}/dataset_card.png")
    if args.json:
        _print_json({**card, "chart": str(png)})
        return 0
    w, h = card["mean_resolution"]
    print(f"images            {card['images']}  (skipped {card['skipped']}: {card['skip_reasons'] or '-'})")
    print(f"mean resolution   {w:.0f}x{h:.0f}")
    print("shot types        " + ", ".join(f"{k} {v}" for k, v in card["shot_types"].items()))
    print(f"categories        {card['categories']} of {card['categories_in_protocol']} answered")
    print(f"attribute labels  {card['attributes']} ({card['attributes_per_image']} per image)")
    print(f"parsing maps      {card['with_parsing']}, captions {card['with_caption']}")
    for q, v in card["per_category"].items():
        if v:
            print(f"  {q:<18} " + ", ".join(f"{a} {n}" for a, n in v.items()))
    print(f"chart: {png}")
    return 0


# --- train / export-lora ---------------------------------------------------------------------------------
def cmd_train(args) -> int:
    """Run a training config (Eq. 4: noise loss + HOLA; LoRA or full; the toy VAE stage)."""
    from .train import run_cli

    return run_cli(args)


def cmd_export_lora(args) -> int:
    """Convert a diffusers-format LoRA (OUTPUT/lora of a training run) to kohya's format (A1111, ComfyUI)."""
    from .train import export_lora

    out = export_lora(args.lora_dir, args.out, format=args.format)
    print(f"wrote {out} ({args.format} format)")
    return 0


def cmd_export_pipeline(args) -> int:
    """A full fine-tune's checkpoint (newest, or --step) as a diffusers pipeline folder."""
    from .train import export_pipeline

    folder = export_pipeline(args.run_dir, args.out, step=args.step)
    print(f"wrote {folder} (load it with cosmiclite.models.load_pipeline or --model)")
    return 0


def cmd_demo(args) -> int:
    """The main job: data -> captions -> attention -> LoRA with and without HOLA -> report (cosmiclite.demo)."""
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, steps=args.steps, eval_people=args.eval_people, model=args.model, seed=args.seed)
    if args.quick:
        cfg.steps, cfg.eval_people, cfg.train_people, cfg.gen_steps, cfg.batch_size = 10, 4, 64, 5, 8
    s = run_demo(cfg)
    print(f"report: {args.out}/report.md  ({s['seconds']} s)")
    for name, m in s["models"].items():
        a = m["alignment"]
        print(f"  {name:<16} part specificity {a['specificity_finest']:.2f} ({a['finest']}x{a['finest']})   "
              f"lift {a['mean_lift']:.2f}   Acc_all {100 * m['accuracy']['acc_all']:.1f}")
    d = s["hola_minus_noise_only"]
    print(f"  per-image accuracy, HOLA minus noise only: {100 * d['mean']:+.1f} points "
          f"(95 % interval {100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f}, {d['images']} people)")
    return 0


# --- the parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cosmiclite", description="CosmicMan (CVPR 2024), taken apart: "
                                 "label protocol, discretized captions, attention, HOLA.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("protocol", help="print the label protocol: 18 parts, 70 questions, caption groups")
    s.add_argument("--json", action="store_true", help="machine-readable: {parts, groups, questions, ...}")
    s.set_defaults(run=cmd_protocol)

    s = sub.add_parser("caption", help="compose an annotation's caption and discretize it into groups")
    s.add_argument("annotation", help="an annotation JSON file, e.g. data_samples/annotations/fig3_example.json")
    s.add_argument("--drop", action="append", metavar="GROUP", help="leave a caption group out (repeatable)")
    s.add_argument("--json", action="store_true",
                   help="machine-readable: {caption, input_ids, groups: [{name, phrases, span}], ...}")
    s.set_defaults(run=cmd_caption)

    s = sub.add_parser("discretize", help="discretize a free-form caption into groups with token spans")
    s.add_argument("text", nargs="+", help='the caption (quote it), or "-" to read it from stdin')
    s.add_argument("--json", action="store_true",
                   help="machine-readable: {caption, input_ids, groups: [{name, phrases, span}], ...}")
    s.set_defaults(run=cmd_discretize)

    s = sub.add_parser("generate", help="generate an image and capture its cross-attention maps (per group/token)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a free-form caption (discretized into groups with the free-text lexicon)")
    src.add_argument("--annotation", help="an annotation JSON file: its composed caption is used")
    s.add_argument("--model", help="a pipeline folder (diffusers layout), a cached hub id, or sd15 / sdxl / "
                   "cosmicman-sd / cosmicman-sdxl (default: the kit's trained toy model)")
    s.add_argument("--unet", help="a UNet-only checkpoint put over --model's UNet (CosmicMan's release format)")
    s.add_argument("--lora", help="LoRA weights (save_lora_weights format) loaded into the pipeline")
    s.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    s.add_argument("--out", required=True, help="where to write the image (PNG)")
    s.add_argument("--attention", metavar="OUT.safetensors", help="save the maps (names documented in --help "
                   "of the module cosmiclite.cli.cmd_generate and the README)")
    s.add_argument("--attention-png", metavar="OUT.png", help="save the group maps drawn over the image")
    s.add_argument("--per-token", action="store_true", help="also save (and draw) every token's map")
    s.add_argument("--per-step", action="store_true", help="keep one map per denoising step, not their mean")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=cmd_generate)
    s = sub.add_parser("train-judge", help="train the toy attribute judge (Sec. 5.1) on toy renders, "
                       "record its held-out accuracy")
    s.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    s.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    s.add_argument("--pool", type=int, default=12000, help="toy people rendered once for training (default 12000)")
    s.add_argument("--eval-seeds", type=int, default=2000, help="held-out seeds 0..N-1 to measure on (default 2000)")
    s.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    s.add_argument("--seed", type=int, default=0, help="random seed of init, batches and augmentation")
    s.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (default 3e-3)")
    s.add_argument("--init", metavar="PATH", help="continue from a trained judge's .safetensors (same heads)")
    s.add_argument("--vae", metavar="DIR", help="a diffusers AutoencoderKL folder: also train on its reconstructions")
    s.add_argument("--vae-pool", type=int, default=4096, help="with --vae: how many pool people are also seen "
                   "reconstructed (reconstructed once, ~80 ms each on one core; default 4096)")
    s.add_argument("--vae-p", type=float, default=0.5, help="with --vae: the share of each batch drawn from the "
                   "reconstructions (default 0.5; a small --vae-pool seen that often is memorised)")
    s.add_argument("--parse-stride", type=int, choices=(2, 4), default=4, help="read each region's features at 1/4 "
                   "of the image side (default) or 1/2 (more pixels for small parts: hats, bags, belts)")
    s.add_argument("--fine-blocks", type=int, default=0, help="residual conv blocks on the features at 1/2 of the "
                   "side (default 0; with --init, a judge with fewer is deepened, starting equal in function)")
    s.add_argument("--device", default="cpu", help="where to train and measure: cpu (default) or cuda; the weights "
                   "are saved for the CPU either way")
    s.add_argument("--workers", type=int, default=1, help="processes rendering the training pool (default 1)")
    s.add_argument("--out", metavar="PATH", help="weights path (default cosmiclite/assets/judge.safetensors; "
                   "the JSON config goes beside it)")
    s.set_defaults(run=cmd_train_judge)

    s = sub.add_parser("toyworld", help="render toy people (image, ATR parsing map, annotation, caption) "
                       "into a Hugging Face imagefolder dataset")
    s.add_argument("--n", type=int, required=True, help="how many people")
    s.add_argument("--out", required=True, help="output folder (images/, parsing/, metadata.jsonl)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels, 8..256 (default 64)")
    s.add_argument("--seed", type=int, default=0, help="first seed; person i is seed+i (default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing metadata.jsonl")
    s.set_defaults(run=cmd_toyworld)

    s = sub.add_parser("dataset-card", help="Table-1-style statistics of an imagefolder dataset, and a bar chart")
    s.add_argument("dir", help="a dataset folder with metadata.jsonl (e.g. data_samples/toy)")
    s.add_argument("--chart", metavar="PNG", help="where to save the chart (default DIR/dataset_card.png)")
    s.add_argument("--json", action="store_true", help="machine-readable statistics")
    s.set_defaults(run=cmd_dataset_card)

    s = sub.add_parser("train", help="train from a YAML config: LoRA/full fine-tune with HOLA (Eq. 4), or the "
                       "toy base model (stage vae, then unet)")
    s.add_argument("--config", required=True, help="YAML training config (presets in configs/)")
    s.add_argument("--max-steps", type=int, default=None, help="override run.max_steps")
    s.add_argument("--output", default=None, help="run folder (default: the config's `output`)")
    s.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in the run folder")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set run.batch_size=8 (YAML value syntax)")
    s.set_defaults(run=cmd_train)

    s = sub.add_parser("export-lora", help="convert a trained LoRA (diffusers format) to kohya's .safetensors")
    s.add_argument("lora_dir", help="the LoRA folder a training run wrote (OUTPUT/lora)")
    s.add_argument("--format", default="kohya", choices=["kohya"], help="target format (default kohya)")
    s.add_argument("--out", required=True, help="the .safetensors file to write")
    s.set_defaults(run=cmd_export_lora)

    s = sub.add_parser("export-pipeline", help="a full fine-tune's checkpoint as a diffusers pipeline folder")
    s.add_argument("run_dir", help="the training run's --output folder")
    s.add_argument("--out", required=True, help="the pipeline folder to write")
    s.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest complete one)")
    s.set_defaults(run=cmd_export_pipeline)

    s = sub.add_parser("demo", help="the main job: the whole story on the toy world (data, attention, LoRA "
                                    "with/without HOLA, accuracy) into a report folder, in minutes on a CPU")
    s.add_argument("--out", default="demo_report", help="report folder (default demo_report)")
    s.add_argument("--steps", type=int, default=200, help="LoRA steps per fine-tune (default 200)")
    s.add_argument("--eval-people", type=int, default=24, help="held-out people measured (default 24)")
    s.add_argument("--model", default=None, help="a toy pipeline folder (default: the shipped toy model)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quick", action="store_true", help="a one-minute smoke run (tiny sizes; for tests)")
    s.set_defaults(run=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0 ok, 2 bad input)."""
    from .protocol import AnnotationError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AnnotationError as e:
        print(f"cosmiclite {args.command}: error: {e}", file=sys.stderr)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cosmiclite {args.command}: error: {msg}", file=sys.stderr)
    except BrokenPipeError:  # `cosmiclite protocol | head`: the reader left, which is fine
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
