#!/usr/bin/env bash
# Every GPU-only check of the project in one go (about 8 minutes on one H100/H200), then one table.
#   bash bench/gpu_check.sh          # on a GPU machine
#   bash bench/gpu_check.sh --cpu    # smoke mode: the same steps at toy sizes on the CPU (tests this script)
# Writes the full log to ${OUT:-.}/gpu_check.log and the table to ${OUT:-.}/gpu_check_table.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
log="$out/gpu_check.log"
: > "$log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SCRATCHLM_TOKENIZER="${SCRATCHLM_TOKENIZER:-$PWD/../shared/tokenizers/phi-2}"
export SCRATCHLM_DATA="${SCRATCHLM_DATA:-$PWD/../shared/data/clean}"

if [[ "${1:-}" == "--cpu" ]]; then
  dev=cpu; prec=fp32; big=phi-tiny; mid=phi-tiny; block=64; batch=2; gen_batches="4"; gen_tokens="16"; steps=2
  run_model=phi-tiny; run_block=64; run_args="--micro-batch-size 4 --eval-interval 5 --max-steps 40 --lr 3e-3 --warmup-steps 5"
else
  dev=cuda; prec=bf16; big=phi-2; mid=phi-1.5; block=2048; batch=4; gen_batches="64 256"; gen_tokens="128 256"
  steps=5
  run_model=phi-1.5; run_block=1024; run_args="--micro-batch-size 16 --eval-interval 25 --max-steps 400 --lr 1e-3 --warmup-steps 20 --compile"
fi

step() {  # step NAME COMMAND...: run, log, keep its RESULT lines
  echo "=== $1" | tee -a "$log"
  shift
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$log" | grep -E "^RESULT|target reached|Error|error:" || true
  echo "--- ${SECONDS}s" | tee -a "$log"
}

[[ $dev == cuda ]] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$log"
if [[ $dev == cuda ]]; then step "bf16 parity" python -m pytest -q -m gpu tests/test_gpu.py; fi
for model in $(echo $mid $big | tr ' ' '\n' | uniq); do  # on the CPU both are phi-tiny: run it once
  for compile in "" "--compile"; do
    step "train $model $compile" python bench/train_throughput.py --model "$model" --batch $batch --block $block \
      --device $dev --precision $prec --warmup 3 --steps $steps --repeats 1 $compile
  done
done
step "fsdp world size 1" python -m torch.distributed.run --nproc_per_node 1 -m scratchlm train --model $mid \
  --strategy fsdp --device $dev --block-size $block --micro-batch-size $batch --max-steps $((steps + 3)) \
  --eval-interval 1000 --eval-batches 1 --checkpoint-interval 1000 --out "$out/fsdp-run"
for n in $gen_tokens; do  # each run: sampled at the teacher's settings (T 0.8, top-p 0.95) and greedy
  step "generation $n new tokens" python bench/gen_throughput.py --model $big --batch $gen_batches \
    --new-tokens "$n" --device $dev --repeats 2 $([[ $dev == cuda ]] && echo --hf-static-compile)
done
step "$run_model to initial loss - 1" python -m scratchlm train --model $run_model --block-size $run_block \
  --target-loss auto --out "$out/target-run" --device $dev $run_args

echo
echo "===== gpu_check summary ($dev) =====" | tee "$out/gpu_check_table.txt"
{ grep -E "^RESULT" "$log" | sed 's/^RESULT //'
  grep -E "passed|failed" "$log" | tail -1
  grep -E "target reached|tokens_per_s\": |ratio ours" "$log" | grep -E "target reached" | tail -1
  grep -E "tok/s" "$out/fsdp-run/train.log" 2>/dev/null | tail -1 | sed 's/^/fsdp ws1: /'
} | tee -a "$out/gpu_check_table.txt"
