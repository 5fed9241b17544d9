"""The `cosmiclite` command line: one subcommand per concept of the kit.

    cosmiclite protocol [--json]                 the label protocol (Sec. 3.2.2)
    cosmiclite caption ANNOTATION.json [--json]  caption, groups, phrases, token spans and ids (Sec. 4.2)
    cosmiclite discretize "free text" [--json]   the same for a free-form caption

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
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (0 ok, 2 bad input)."""
    from .protocol import AnnotationError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AnnotationError as e:
        print(f"cosmiclite {args.command}: error: {e}", file=sys.stderr)
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cosmiclite {args.command}: error: {msg}", file=sys.stderr)
    except BrokenPipeError:  # `cosmiclite protocol | head`: the reader left, which is fine
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
