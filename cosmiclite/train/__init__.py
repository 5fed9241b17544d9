"""Daring training (CosmicMan, Sec. 4.3, Eq. 4): L = α·L_noise + β·L_HOLA, one loop on accelerate.

One YAML config drives every run the kit makes (`config`):

    stage: vae    the toy model's autoencoder, from scratch (`cosmiclite.toy_vae`), for a from-scratch base model;
    stage: unet   the denoiser: from scratch (the toy base model: noise loss only, β = 0, full training),
                  LoRA on the UNet attention projections (peft), or a full fine-tune, with HOLA (Eq. 3) when β > 0.

The package, by what it does:

    config       TrainConfig and its sections, `load_config`, `check_config` (every check before training starts)
    data         `TrainData`: the samples of each step (built by `cosmiclite.data.training_sample`, as the notebooks
                 build theirs), the caption augmentation, the latent pool; the per-sample random draws
    loop         `Trainer`, whose step `daring_step` is Eq. 4 as notebook 05 computes it; `train`
    checkpoints  atomic save, list, resume, pruning; EMA and LoRA-only parts
    export       LoRA (diffusers, kohya) and pipeline folders
    components   the model components a config starts from; the text conditioning τ(c)

Captions are augmented as CosmicMan trains: the body group (which holds the shot phrase) first, the other
groups shuffled, each dropped with a small probability (spans and masks follow the text), and the caption
emptied for 10 % of samples (unconditional dropout, so classifier-free guidance works).

Exact resume: the data of step k (which samples, their caption augmentation, the noise and timesteps) is a
pure function of (seed, k, process index), so a run restarted from the checkpoint of step k replays steps
k+1 … exactly; the trainable weights, optimizer, LR scheduler and the RNG states are in the checkpoint.

Scaling out: the same loop runs unchanged under `accelerate launch` / `torchrun -m cosmiclite.train` with DDP,
DeepSpeed ZeRO-2 or FSDP (configs/accelerate/). The global batch is

    global batch = run.batch_size (per process) × processes × run.grad_accum,

and `optim.scale_lr: true` multiplies optim.lr by it (linear scaling rule). Process r of W takes the samples of
global positions k·B·W + r·B + i, and every per-sample draw is keyed by that position, so W processes × batch B
see exactly the samples, noise and timesteps of 1 process × batch W·B (tests/test_distributed.py checks the loss
curve and the weights). The data-parallel mean is exact for HOLA too: a process's HOLA mean over its kept samples
is re-weighted by its share of the kept samples of the whole global batch (`Trainer._hola_dp_weight`). Gradient
accumulation, no_sync and DeepSpeed's own accumulation come from `accelerator.accumulate`; the LR schedule
counts optimizer steps, so a checkpoint resumes under any process count. Logged losses are averaged over the
processes; log.csv, validation images and outputs are written by the main process only. EMA of the UNet (`ema:`,
diffusers' EMAModel, fp32 shadow weights) is saved with every checkpoint and resumed.

HOLA under wrapping: the capture processors and the pre-forward hook are installed on the unwrapped UNet (the
module inside DDP / the DeepSpeed engine / the root FSDP unit). DDP and DeepSpeed call that module's forward, so
every attention layer records as in one process (tested under DDP). FSDP (use_orig_params) keeps the module tree
and its plain-Python processor objects; each wrapped BasicTransformerBlock gathers its weights before its forward,
so the processor computes M on full weights and the maps stay in the autograd graph, whose backward runs through
FSDP's gradient reduce-scatter like any activation.

But: no SNR weighting, no aspect-ratio buckets; validation renders images only (the notebooks draw the attention
maps). Under FSDP there is no EMA (the shadow weights would be shards) and validation is skipped (sharded weights
cannot be sampled on one process: sample from OUTPUT/pipeline). LoRA runs are meant for one GPU or DDP; DeepSpeed
saves the UNet in its training dtype (bf16 under bf16; the fp32 master weights stay in the checkpoint).
"""
from .checkpoints import latest_checkpoint, list_checkpoints
from .components import load_components, text_embeddings
from .config import ConfigError, TrainConfig, check_config, load_config
from .data import TrainData, sample_seed
from .export import LORA_WEIGHTS, export_lora, export_pipeline, save_full_pipeline, save_lora
from .loop import Trainer, keep_freed_memory, run_cli, train

__all__ = ["TrainConfig", "ConfigError", "load_config", "check_config", "train", "run_cli", "Trainer", "TrainData",
           "sample_seed", "export_lora", "save_lora", "export_pipeline", "save_full_pipeline", "load_components",
           "text_embeddings", "latest_checkpoint", "list_checkpoints", "keep_freed_memory", "LORA_WEIGHTS"]
