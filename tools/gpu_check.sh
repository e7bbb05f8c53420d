#!/usr/bin/env bash
# One short GPU check of what only a GPU can show (run from the repo root on a CUDA machine):
# accelerate + DeepSpeed ZeRO-2 end to end with the tiny-sd UNet in bf16, the same under plain
# accelerate (bf16 autocast), and bench_step's images/s and MFU at batch 64. Prints results as it goes.
set -euo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f /tmp/expert/expert.json ] || python3 - <<'PY'
from fadscale.data.shard import shard_dataset
from fadscale.config import ExpertConfig, load_config
from fadscale.train_expert import train
shard_dataset("procedural:per_class=96,size=64,seed=0", "/tmp/s64", val_fraction=0.1, grayscale=True,
              progress=False, workers=8, overwrite=True)
train(load_config(ExpertConfig, "configs/tiny/expert.yaml", ["data.shards=/tmp/s64", "run.out_dir=/tmp/expert",
      "data.image_size=64", "model.input_size=64", "train.epochs=2", "data.subset=all"]))
PY
common="--config configs/fad.yaml --set data.shards=/tmp/s64 --set expert=/tmp/expert/expert.json
 --set cache.dir=/tmp/cache --set train.max_steps=40 --set data.batch_size=32 --set train.log_every=10
 --set checkpoint.every=20 --set data.workers=4 --set optim.warmup_steps=5"
for arm in deepspeed_zero2 single_gpu; do
  start=$(date +%s)
  python3 -m accelerate.commands.launch --config_file launch/accelerate/$arm.yaml --num_processes 1 \
    -m fadscale.train_fad $common --set run.out_dir=/tmp/fad-$arm 2>&1 | grep -v "step/s\|tile/s" | tail -n 25
  echo "== $arm: $(( $(date +%s) - start )) s wall"
  python3 - "$arm" <<'PY'
import json, sys
from fadscale.runtime.logging import read_metrics
arm = sys.argv[1]
card = json.load(open(f"/tmp/fad-{arm}/final/run_card.json"))
rows = read_metrics(f"/tmp/fad-{arm}")
print(arm, "step", card["step"], "mixed", card["mixed_precision"], "losses",
      [round(r["loss/noise"], 4) for r in rows], "align", [round(r["loss/align"], 4) for r in rows],
      "images/s", [round(r["train/images_per_s"], 1) for r in rows], "mem GiB", round(rows[-1]["train/memory_gib"], 2))
PY
done
python3 tools/bench_step.py --batches 64 --precisions fp32 bf16 --ckpt off --reps 5 | tee "$OUT/bench_step_gpu.txt"
