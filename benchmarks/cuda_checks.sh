#!/usr/bin/env bash
# The CUDA measurements in one go (a few minutes on one H100), for a session that has a GPU for minutes only:
#   1. benchmarks/hola_overhead.py: HOLA step-time and peak-memory ratios on the SD 1.5-sized UNet (random weights),
#      512 px, batch 4, bf16, gradient checkpointing, and the LoRA + HOLA peak at batch 1 (issue targets 1.10,
#      1.10, 12 GB);
#   2. benchmarks/capture_overhead.py: inference capture cost (toy, SD 1.5 at 256 and 512 px);
#   3. the same HOLA ratios with the toy preset's max-normalised maps;
#   4. `cosmiclite train` of configs/toy_lora.yaml in bf16 on the GPU for a few steps (the single-GPU LoRA path).
# Results: benchmarks/results/*-cuda-*.json; the training run and logs under OUTDIR.
#   bash benchmarks/cuda_checks.sh [OUTDIR]
set -u
out=${1:-runs/cuda_checks}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, peft, transformers, accelerate as a; print('torch', torch.__version__,
'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__,
'accelerate', a.__version__)"
step() { echo "== $*"; local t0=$SECONDS; "$@" || echo "!! exit $? after $((SECONDS - t0)) s: $*"; }
step timeout 200 python3 benchmarks/hola_overhead.py
step timeout 110 python3 benchmarks/capture_overhead.py
step timeout 110 python3 benchmarks/hola_overhead.py --normalize max
python3 - "$out" <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open("configs/toy_lora.yaml"))
cfg["run"].update(mixed_precision="bf16", checkpoint_every=50, log_every=10)
yaml.safe_dump(cfg, open(f"{sys.argv[1]}/toy_lora_bf16.yaml", "w"))
EOF
step timeout 100 python3 -m cosmiclite train --config "$out/toy_lora_bf16.yaml" --max-steps 100 --output "$out/toy_lora_bf16"
ls -la "$out/toy_lora_bf16" 2>/dev/null
