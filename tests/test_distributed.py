"""Data parallelism is exact: 2 processes x batch b train like 1 process x batch 2b.

Real multi-process runs on the CPU: `torchrun --nproc_per_node 2 -m cosmiclite.train` gives accelerate a gloo
group (DistributedType.MULTI_CPU) and DDP wraps the UNet, as on a GPU node. The tiny full fine-tune has HOLA on
(so the captured maps must record under DDP, and HOLA's mean over kept samples must be re-weighted exactly),
gradient accumulation 2 (no_sync on the first micro-step) and an EMA (saved with the checkpoint and resumed).
Then a checkpoint of the 2-process run is resumed by 1 process and must end where the 1-process run ends.
Marked slow: three short runs, ~40 s on two idle cores (most of it importing torch/diffusers in the children).
"""
import csv
import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from cosmiclite.scaling import global_batch, memory_estimate
from cosmiclite.train import ConfigError, latest_checkpoint, load_config, train

B = 2            # per-process batch of the 2-process run
STEPS = 4


def config(out) -> dict:
    return {"stage": "unet", "seed": 0, "output": str(out),
            "model": {"arch": "tiny-sd15", "pretrained": None, "init_seed": 0},
            "data": {"source": "toy", "image_size": 32, "num_samples": 16},
            "lora": None,
            "ema": {"decay": 0.9},
            # drop_prob 0.5: the two processes keep different numbers of HOLA samples, so the re-weighting matters
            "hola": {"alpha": 1.0, "beta": 1.0, "resolutions": [8, 16], "drop_prob": 0.5},
            # eps 1e-4: a few biases have an exactly-zero true gradient (a conv bias right before a one-channel
            # GroupNorm group), so their gradients are rounding noise (~1e-10) that a batch split rounds differently,
            # and Adam with eps 1e-8 would turn that noise into full ±lr steps. 1e-4 damps only those.
            "optim": {"lr": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 1, "eps": 1e-4},
            "run": {"batch_size": 2 * B, "grad_accum": 2, "max_steps": STEPS, "checkpoint_every": 2,
                    "log_every": 1, "threads": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, tmp_path):
    """A subprocess with one thread per process (two processes share the 2-core CI machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def rows(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process × 2B (in this process), 2 processes × B (torchrun), and the 2-process checkpoint of step 2
    continued by 1 process × 2B (in this process)."""
    tmp = tmp_path_factory.mktemp("dist")
    cfg_file = tmp / "tiny_full.yaml"
    cfg_file.write_text(yaml.safe_dump(config(tmp / "unused")))
    one, two, resumed = tmp / "one", tmp / "two", tmp / "resumed"
    train(cfg_file, output=one)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "cosmiclite.train", "--config", str(cfg_file),
         "--output", str(two), "--set", f"run.batch_size={B}"], tmp)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    shutil.copy(two / "log.csv", resumed / "log.csv")
    result = train(cfg_file, output=resumed, resume=True)
    return one, two, resumed, result


def unet(out, sub="pipeline/unet"):
    return load_file(str(out / sub / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k]).abs().max().item() for k in a)
    assert worst < atol and moved > 0, f"max |difference| {worst:.3g}"


@pytest.mark.slow
def test_two_processes_give_the_loss_curve_of_one(runs):
    one, two, *_ = runs
    r1, r2 = rows(one), rows(two)
    assert [int(r["step"]) for r in r1] == [int(r["step"]) for r in r2] == list(range(1, STEPS + 1))
    for a, b in zip(r1, r2):
        for k in ("loss", "noise_loss", "hola_loss", "lr"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-4, abs=1e-7), (k, a, b)
        assert float(a["hola_loss"]) > 0          # the capture recorded under DDP wrapping
    losses = [float(r["loss"]) for r in r1]
    assert len(set(losses)) == len(losses)        # the curve moves: not one batch logged again and again


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one(runs):
    one, two, *_ = runs
    assert_same_weights(unet(one), unet(two))                          # the EMA weights (pipeline)
    assert_same_weights(unet(one, "unet_raw"), unet(two, "unet_raw"))  # the raw last weights
    raw, ema = unet(one, "unet_raw"), unet(one)
    assert max((raw[k] - ema[k]).abs().max().item() for k in raw) > 1e-6   # the EMA is not the raw weights


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one(runs):
    one, two, resumed, result = runs
    assert result["step"] == STEPS
    step, folder = latest_checkpoint(two)
    assert step == STEPS and (folder / "ema_unet.safetensors").is_file() and (folder / "COMPLETE").is_file()
    assert sorted(p.name for p in folder.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert not list((two / "checkpoints").glob(".tmp-*"))           # only the main process renamed, once
    assert [int(x["step"]) for x in rows(resumed)] == list(range(1, STEPS + 1))
    for a, b in zip(rows(one)[2:], rows(resumed)[2:]):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-4)
    assert_same_weights(unet(one), unet(resumed))
    assert_same_weights(unet(one, "unet_raw"), unet(resumed, "unet_raw"))


def test_global_batch_and_memory_estimate():
    assert global_batch(4, 8, 2) == 64
    P = 1_000_000
    ddp = memory_estimate(P, 8, "ddp", "bf16")
    z2 = memory_estimate(P, 8, "zero2", "bf16", bucket_elements=0)
    fs = memory_estimate(P, 8, "fsdp", "bf16", unit_params=1000)
    assert ddp.total == (4 + 2 + 4 + 8) * P                      # fp32 weights, bf16 copy, fp32 grads, Adam
    assert z2.total == 2 * P + (2 + 12) * P / 8                  # ZeRO paper: 2Ψ + (2 + K)Ψ/N, K = 12
    assert fs.total == 16 * P / 8 + 2 * 2 * 1000
    assert memory_estimate(P, 1, "ddp", "no", ema=True).total == 20 * P
    with pytest.raises(ValueError, match="unit_params"):
        memory_estimate(P, 8, "fsdp")
    with pytest.raises(ValueError, match="mode="):
        memory_estimate(P, 8, "zero3")


def test_ema_config_errors(tmp_path):
    cfg = config(tmp_path)
    load_config(cfg)
    with pytest.raises(ConfigError, match="ema is set but only the full fine-tune"):
        load_config({**cfg, "lora": {"rank": 4}})
    with pytest.raises(ConfigError, match="ema.decay"):
        load_config({**cfg, "ema": {"decay": 1.5}})
    with pytest.raises(ConfigError, match=r"config.ema: unknown key\(s\) \['decey'\]"):
        load_config({**cfg, "ema": {"decey": 0.9}})
