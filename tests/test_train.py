"""The Daring trainer (Eq. 4): config errors, a LoRA + HOLA run that learns, exact resume after SIGKILL,
atomic checkpoints, and LoRA files a stock diffusers pipeline loads (diffusers and kohya formats).

Everything runs on the "tiny-sd15" architecture (32 px images, a UNet of a few hundred thousand parameters),
so each run takes seconds on the CPU.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from cosmiclite.hola import daring_loss, hola_terms
from cosmiclite.train import ConfigError, Trainer, export_lora, latest_checkpoint, load_config
from cosmiclite.train.data import DROP, per_sample_rand


def tiny(out, **changes) -> dict:
    cfg = {"stage": "unet", "seed": 0, "output": str(out),
           "model": {"arch": "tiny-sd15", "pretrained": None, "init_seed": 0},
           "data": {"source": "toy", "image_size": 32, "num_samples": 8},
           "lora": {"rank": 4, "alpha": 8},          # alpha != rank: the kohya export must carry the scale
           "hola": {"alpha": 1.0, "beta": 1.0, "resolutions": [8, 16]},
           "optim": {"lr": 1e-2},
           "run": {"batch_size": 2, "max_steps": 4, "checkpoint_every": 2, "log_every": 1, "threads": 1}}
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        node[last] = value
    return cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One in-process 4-step LoRA + HOLA run, and the losses on a fixed batch before and after it."""
    out = tmp_path_factory.mktemp("lora_run")
    trainer = Trainer(load_config(tiny(out)))
    trainer.prepare_data()
    batch = trainer.data.batch(0)                       # the same samples, noise and t each time
    with torch.no_grad():
        before = {k: float(v) for k, v in trainer.daring_step(batch).items()}
    result = trainer.run()
    with torch.no_grad():
        after = {k: float(v) for k, v in trainer.daring_step(batch).items()}
    return out, before, after, result


def test_config_errors_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"config.run: unknown key\(s\) \['batchsize'\]"):
        load_config(tiny(tmp_path, **{"run.batchsize": 3}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(tiny(tmp_path, **{"hola.betta": 1.0}))
    with pytest.raises(ConfigError, match="data.path is missing"):
        load_config(tiny(tmp_path, **{"data.source": "folder"}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tiny(tmp_path, **{"data.source": "folder", "data.path": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match="rank >= 1"):
        load_config(tiny(tmp_path, **{"lora.rank": 0}))
    with pytest.raises(ConfigError, match="num_samples"):
        load_config(tiny(tmp_path, **{"data.latent_pool": True, "data.num_samples": None}))
    # beta > 0 on a dataset without parsing maps
    from cosmiclite.data import Record, write_imagefolder
    from cosmiclite.toyworld import render
    p = render(0, size=32)
    folder = write_imagefolder([Record(p.image, None, p.annotation)], tmp_path / "noparse")
    with pytest.raises(ConfigError, match="no parsing masks"):
        load_config(tiny(tmp_path, **{"data.source": "folder", "data.path": str(folder)}))
    load_config(tiny(tmp_path, **{"data.source": "folder", "data.path": str(folder), "hola.beta": 0.0}))
    # the CLI turns them into one line and exit status 2, and nothing is written
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny(tmp_path / "never", **{"lora.rank": 0})))
    r = subprocess.run([sys.executable, "-m", "cosmiclite.train", "--config", str(cfg_file)], capture_output=True, text=True)
    assert r.returncode == 2 and "lora.rank" in r.stderr and not (tmp_path / "never").exists()


def test_lora_hola_run_lowers_the_loss(lora_run):
    out, before, after, result = lora_run
    assert result["step"] == 4
    assert after["loss"] < before["loss"]
    assert after["hola_loss"] < before["hola_loss"]
    rows = list(csv_rows(out / "log.csv"))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(float(r["hola_loss"]) > 0 for r in rows)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def csv_rows(path):
    import csv
    with open(path) as f:
        yield from csv.DictReader(f)


def test_interrupted_checkpoint_is_never_loaded(lora_run, tmp_path):
    out, *_ = lora_run
    ckpts = out / "checkpoints"
    assert latest_checkpoint(out)[0] == 4 and sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # a later checkpoint whose writing was cut: no COMPLETE marker, and a half-written temp folder
    import shutil
    shutil.copytree(ckpts / "checkpoint-4", ckpts / "checkpoint-6")
    (ckpts / "checkpoint-6" / "COMPLETE").unlink()
    (ckpts / "checkpoint-6" / "trainable_0.safetensors").write_bytes(b"garbage")
    (ckpts / ".tmp-checkpoint-8").mkdir()
    (ckpts / ".tmp-checkpoint-8" / "optimizer.bin").write_bytes(b"half")
    assert latest_checkpoint(out)[0] == 4
    trainer = Trainer(load_config(tiny(out)))
    assert trainer.resume() == 4                      # loads 4, never the broken 6 or the temp 8
    assert not (ckpts / ".tmp-checkpoint-8").exists()
    shutil.rmtree(ckpts / "checkpoint-6")


def _weights(path):
    return load_file(str(path))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    changes = {"run.max_steps": 6}
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = lambda out, *extra: [sys.executable, "-m", "cosmiclite.train", "--config", str(write(out)), *extra]

    def write(out):
        f = tmp_path / f"{out.name}.yaml"
        f.write_text(yaml.safe_dump(tiny(out, **changes)))
        return f

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(full), check=True, capture_output=True, env=env)
    # the same run, killed without warning once it has logged step 3
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log = killed / "log.csv"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.is_file() and any(int(r["step"]) >= 3 for r in csv_rows(log)):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "lora").exists(), "the run finished before it could be killed"
    r = subprocess.run(cmd(killed, "--resume"), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _weights(full / "lora" / "pytorch_lora_weights.safetensors"), _weights(killed / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 6


def test_hola_gradients_flow_with_gradient_checkpointing(tmp_path):
    trainer = Trainer(load_config(tiny(tmp_path, **{"run.gradient_checkpointing": True, "hola.alpha": 0.0,
                                                     "hola.drop_prob": 0.0})))
    trainer.prepare_data()
    out = trainer.daring_step(trainer.data.batch(0))
    out["loss"].backward()                               # HOLA alone (alpha = 0): its gradient must reach LoRA
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
    assert out["hola_loss"] > 0 and grads and any(g.abs().sum() > 0 for g in grads)


def test_daring_step_is_the_loss_notebook_05_computes(tmp_path):
    """Training's step is Eq. 4 as notebook 05 computes it by hand: hola_terms on the captured maps (the reference
    bracket here, the fused one in training) for the samples HolaConfig.sample_keep keeps, then daring_loss."""
    cfg = load_config(tiny(tmp_path, **{"hola.drop_prob": 0.5, "hola.beta": 0.7, "run.batch_size": 4}))
    trainer = Trainer(cfg)
    trainer.prepare_data()
    batch = trainer.data.batch(0)
    with torch.no_grad():
        out = trainer.daring_step(batch)
        keep = cfg.hola.sample_keep(4, uniforms=per_sample_rand(cfg.seed, batch["pos"], DROP))
        assert 0 < int(keep.sum()) < 4                   # this batch drops some samples' HOLA term, not all
        terms = hola_terms(trainer.store.maps(), batch["spans"], batch["masks"], batch["present"], cfg.hola,
                           image_size=cfg.data.image_size, keep=keep)
    torch.testing.assert_close(out["hola_loss"], terms.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"], daring_loss(out["noise_loss"], terms.loss, cfg.hola), rtol=1e-5, atol=0)


def _image(pipe):
    return pipe("a full-body shot, a woman, red t-shirt", num_inference_steps=2, guidance_scale=1.0, height=32,
                width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]


def test_lora_loads_in_stock_pipeline_and_kohya_export(lora_run, tmp_path):
    from cosmiclite.models import build_pipeline
    out, *_ = lora_run
    base = _image(build_pipeline("tiny-sd15", seed=0))
    pipe = build_pipeline("tiny-sd15", seed=0)          # the same weights the run started from
    pipe.load_lora_weights(str(out / "lora"))
    with_lora = _image(pipe)
    assert np.abs(with_lora - base).max() > 1e-3
    kohya = export_lora(out / "lora", tmp_path / "toy_kohya.safetensors")
    keys = list(load_file(str(kohya)))
    assert keys and all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    pipe2 = build_pipeline("tiny-sd15", seed=0)
    pipe2.load_lora_weights(str(kohya))
    np.testing.assert_allclose(_image(pipe2), with_lora, atol=1e-4)


def test_export_pipeline_from_a_full_fine_tune_checkpoint(tmp_path):
    """A mid-run checkpoint exports as a pipeline whose UNet holds that step's weights, and which generates."""
    from cosmiclite.models import load_pipeline
    from cosmiclite.train import export_pipeline, train

    out = tmp_path / "full"
    train(tiny(out, lora=None, **{"hola.beta": 0.0, "run.max_steps": 2, "run.checkpoint_every": 1,
                                  "run.keep_checkpoints": 2}))
    with pytest.raises(ValueError, match="no complete checkpoint at step 7"):
        export_pipeline(out, tmp_path / "nope", step=7)
    folder = export_pipeline(out, tmp_path / "step1", step=1)
    pipe = load_pipeline(folder, torch_dtype=torch.float32)
    saved = _weights(out / "checkpoints" / "checkpoint-1" / "model.safetensors")
    mine = pipe.unet.state_dict()
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in saved)
    final = load_pipeline(out / "pipeline", torch_dtype=torch.float32).unet.state_dict()
    assert any(not torch.equal(final[k], mine[k]) for k in mine)       # step 1 is not step 2
    assert json.loads((folder / "checkpoint.json").read_text())["step"] == 1
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red t-shirt", num_inference_steps=2, output_type="np").images[0]
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()


def test_lora_starts_from_the_config_seed_whatever_the_global_rng(tmp_path):
    """The adapter's initial weights depend on `seed` alone: torch seeds its global RNG at random in each process,
    and loading a pretrained model (here the shipped toy one) does not reseed it."""
    def lora_a(global_seed, seed=0):
        torch.manual_seed(global_seed)
        cfg = tiny(tmp_path / f"g{global_seed}_{seed}", seed=seed)
        cfg["model"] = {"pretrained": "toy"}
        cfg["data"]["image_size"] = 64
        model = Trainer(load_config(cfg)).model
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    a, b = lora_a(1), lora_a(2)
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    c = lora_a(1, seed=1)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_keep_freed_memory_sets_glibc_malloc_where_there_is_glibc():
    """The trainer's CPU allocator setting: glibc accepts both mallopt values (it refuses an mmap threshold above
    its 32 MiB maximum, for one); elsewhere the call does nothing and says so."""
    import platform

    from cosmiclite.train import keep_freed_memory
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
