"""Checkpoints: atomic save, list, resume, pruning; the EMA and LoRA-only parts.

A checkpoint is written into a temporary folder (every rank writes its part: DeepSpeed/FSDP optimizer shards, RNG
states), then, after a barrier, the main process fsyncs it, writes the COMPLETE marker last and renames it, so a
folder without the marker is never loaded (multi-node runs need the output folder on a shared file system). The
trainable weights, optimizer, LR scheduler and the torch/numpy/python RNG states are `accelerate.save_state`'s;
the EMA's shadow weights are saved beside them as safetensors.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

__all__ = ["COMPLETE", "CKPT_PREFIX", "list_checkpoints", "latest_checkpoint", "save_checkpoint", "resume_checkpoint",
           "save_ema", "load_ema", "save_trainable_only"]

COMPLETE = "COMPLETE"              # marker file: a checkpoint folder is whole
CKPT_PREFIX = "checkpoint-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            _fsync(p)
    _fsync(folder)


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, folder), oldest first; folders without the COMPLETE marker are ignored."""
    out = []
    for p in Path(output, "checkpoints").glob(CKPT_PREFIX + "*"):
        marker = p / COMPLETE
        if p.is_dir() and marker.is_file():
            try:
                out.append((int(json.loads(marker.read_text())["step"]), p))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue  # a damaged marker: not a checkpoint we trust
    return sorted(out)


def latest_checkpoint(output: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint of a run folder, or None."""
    cps = list_checkpoints(Path(output))
    return cps[-1] if cps else None


def save_checkpoint(acc, output: Path, step: int, state: dict, keep: int,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Atomic: write into checkpoints/.tmp-checkpoint-N, fsync, COMPLETE marker, rename; keep the newest `keep`.

    state goes to trainer_state.json; extra(folder) writes more files on the main process (the EMA)."""
    root = output / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if extra is not None:
            extra(tmp)
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}))
        _fsync_tree(tmp)
        if final.exists():               # e.g. a run restarted from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        for _, old in list_checkpoints(output)[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def resume_checkpoint(acc, output: Path) -> tuple[int, Path] | None:
    """Load the newest complete checkpoint into the accelerator (partial temp folders are removed, never read).
    Returns (step, folder), or None when there is none."""
    if acc.is_main_process:
        for junk in Path(output, "checkpoints").glob(f".tmp-{CKPT_PREFIX}*"):
            shutil.rmtree(junk, ignore_errors=True)
    acc.wait_for_everyone()
    found = latest_checkpoint(output)
    if found is not None:
        acc.load_state(str(found[1]))
    return found


# ---- the EMA's shadow weights, by parameter name
def save_ema(ema, model: torch.nn.Module, folder: Path) -> None:
    names = [n for n, _ in model.named_parameters()]
    save_file({n: t.detach().cpu().contiguous() for n, t in zip(names, ema.shadow_params)},
              str(folder / "ema_unet.safetensors"))
    (folder / "ema_state.json").write_text(json.dumps({"optimization_step": ema.optimization_step,
                                                       "decay": ema.decay}))


def load_ema(ema, model: torch.nn.Module, folder: Path) -> None:
    f = folder / "ema_unet.safetensors"
    if not f.is_file():
        raise RuntimeError(f"checkpoint {folder} holds no EMA weights (ema_unet.safetensors) but this config has "
                           "`ema:` set: resume with the config that wrote it, or start a new --output")
    state = load_file(str(f))
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for n, s in zip(names, ema.shadow_params):
            s.copy_(state[n])
    ema.optimization_step = json.loads((folder / "ema_state.json").read_text())["optimization_step"]


def save_trainable_only(acc) -> None:
    """LoRA runs: checkpoints hold only the trainable (adapter) weights, not the frozen base UNet."""

    def save_hook(models, weights, out_dir):
        for i, m in enumerate(models):
            state = {n: p.detach().cpu().contiguous() for n, p in acc.unwrap_model(m).named_parameters()
                     if p.requires_grad}
            if acc.is_main_process:
                save_file(state, str(Path(out_dir, f"trainable_{i}.safetensors")))
        weights.clear()

    def load_hook(models, in_dir):
        for i in range(len(models)):
            m = acc.unwrap_model(models[i])
            state = load_file(str(Path(in_dir, f"trainable_{i}.safetensors")))
            params = dict(m.named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in state]
            if missing:
                raise RuntimeError(f"checkpoint {in_dir} lacks trainable weights {missing[:3]}…: "
                                   "was it written by a run with another lora config?")
            with torch.no_grad():
                for n, t in state.items():
                    params[n].copy_(t)
        models.clear()

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)
