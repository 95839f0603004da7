#!/usr/bin/env bash
# lmforge runner for the side-by-side harness (../shared/bench, see its README for the contract):
#   python3 ../shared/bench/bench.py --runners-dir bench matrix --preset sft-smollm2 --runners llamafactory,trl,lmforge
# Runs the project's own .venv (LMFORGE_VENV overrides). lmforge trains through transformers.Trainer,
# so the harness's in-process probe measures it with no code here.
set -euo pipefail
BENCH_CACHE="${BENCH_CACHE:-$HOME/.cache/lmforge-bench}"
VENV="${LMFORGE_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}"

stage=sft model="" data_dir="$BENCH_CACHE/data" method=lora max_steps=30 seq_len=1024 batch_size=4
grad_accum=1 packing=off grad_ckpt=off lr="" seed=42 output_dir="" lora_rank=8 lora_alpha=16 sft_format=alpaca
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) stage="$2" ;; --model) model="$2" ;; --data-dir) data_dir="$2" ;;
    --method) method="$2" ;; --max-steps) max_steps="$2" ;; --seq-len) seq_len="$2" ;;
    --batch-size) batch_size="$2" ;; --grad-accum) grad_accum="$2" ;; --packing) packing="$2" ;;
    --grad-ckpt) grad_ckpt="$2" ;; --lr) lr="$2" ;; --seed) seed="$2" ;; --output-dir) output_dir="$2" ;;
    --lora-rank) lora_rank="$2" ;; --lora-alpha) lora_alpha="$2" ;; --sft-format) sft_format="$2" ;;
    *) echo "run_lmforge.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift 2
done
[[ -z "$lr" ]] && { [[ "$method" == lora ]] && lr=1.0e-4 || lr=1.0e-5; }
[[ "$stage" == sft ]] && dataset="bench_sft_$sft_format" || dataset=bench_pt
# off: padded batches (lmforge groups by length); on and neat: lmforge's one packing mode, which
# never lets packed examples attend to each other.
[[ "$packing" == off ]] && packed=false || packed=true
mkdir -p "$output_dir"
lora_lines=""
[[ "$method" == lora ]] && lora_lines="lora_rank: $lora_rank
lora_alpha: $lora_alpha
lora_dropout: 0.0
lora_target: all"
cat > "$output_dir/lmforge.yaml" <<YAML
model_name_or_path: $model
stage: $stage
finetuning_type: $method
$lora_lines
dataset: $dataset
dataset_dir: $data_dir
template: auto
cutoff_len: $seq_len
packing: $packed
gradient_checkpointing: $([[ "$grad_ckpt" == on ]] && echo true || echo false)
output_dir: $output_dir/model
overwrite_output_dir: true
per_device_train_batch_size: $batch_size
gradient_accumulation_steps: $grad_accum
learning_rate: $lr
lr_scheduler_type: cosine
warmup_ratio: 0.1
max_steps: $max_steps
logging_steps: 1
save_strategy: "no"
plot_loss: false
seed: $seed
YAML
exec "$VENV/bin/lmforge" train "$output_dir/lmforge.yaml"
