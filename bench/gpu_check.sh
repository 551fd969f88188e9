#!/usr/bin/env bash
# Every GPU-only check of the project in one go, then one table.
#   bash bench/gpu_check.sh                # on a GPU machine: every step (about 8 minutes on one H200)
#   bash bench/gpu_check.sh fsdp distill   # only the steps named: a second try after a fix
#   bash bench/gpu_check.sh --cpu [STEP..] # smoke mode: the same steps at toy sizes on the CPU (tests this script)
# Steps, in order of what matters most:
#   train   Phi-2 4 x 2048 bf16, ours + compile against transformers + compile: tokens/s, memory, MFU, and our
#           distilled step (top 20) on the same model
#   fsdp    FSDP2 at world size 1 trains phi-100m 4 steps and resumes to 6
#   distill a teacher scores a book into soft labels (prepare), phi-100m trains on them in fp16 with loss
#           scaling (fp32 on the CPU, where fp16 crawls)
#   target  Phi-1.5 trained to its initial loss - 1
#   gen     Phi-2 as a teacher, batch 64 and 256, sampled (T 0.8, top-p 0.95) and greedy against transformers
#           with static cache + compile; sampled with logprobs 20; scoring 32 x 512 at top 20
#   parity  bf16 logits against transformers
# Each step has its own time limit: one that fails or runs out is marked FAILED in the table, the next one runs.
# Writes the log to ${OUT:-.}/gpu_check.log and the table to ${OUT:-.}/gpu_check_table.txt. The GPU image has
# no web-server packages: bench/RESULTS.md ("GPU") says how they travel as wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
log="$out/gpu_check.log"
: > "$log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SCRATCHLM_TOKENIZER="${SCRATCHLM_TOKENIZER:-$PWD/../shared/tokenizers/phi-2}"
export SCRATCHLM_DATA="${SCRATCHLM_DATA:-$PWD/../shared/data/clean}"
py="${PYTHON:-python3}"  # the GPU image has python3 alone
work=$(mktemp -d -t gpu-check-XXXX)  # runs and checkpoints (tens of GB for Phi-1.5): never under $OUT
export SCRATCHLM_CACHE="${SCRATCHLM_CACHE:-$work/token-cache}"

if [[ "${1:-}" == "--cpu" ]]; then
  shift
  dev=cpu; prec=fp32; half=fp32; big=phi-tiny; mid=phi-tiny; block=64; batch=2; steps=2; limit=300; long_limit=300
  gen_args="--batch 4 --new-tokens 16 --score-len 64 --score-batch 4"
  target_args="--model phi-tiny --block-size 64 --micro-batch-size 4 --eval-interval 5 --max-steps 40 --lr 3e-3 --warmup-steps 5"
else
  dev=cuda; prec=bf16; half=fp16; big=phi-2; mid=phi-100m; block=2048; batch=4; steps=5; limit=180
  long_limit=300  # train and gen: two compilations of Phi-2 each
  gen_args="--batch 64 256 --new-tokens 128 --score-len 512 --score-batch 32 --hf-static-compile"
  target_args="--model phi-1.5 --block-size 1024 --micro-batch-size 16 --eval-interval 10 --max-steps 200 --lr 1e-3 --warmup-steps 20"
fi
steps_wanted="${*:-train fsdp distill target gen parity}"
book="$SCRATCHLM_DATA/books/pg11_alices_adventures_in_wonderland.txt"  # ~40k tokens: scored in seconds

step() {  # step NAME COMMAND...: run under the step's time limit, log, keep its RESULT lines
  echo "=== $1" | tee -a "$log"
  local name=$1 start=$SECONDS lim=$limit
  [[ $name == train || $name == gen ]] && lim=$long_limit
  shift
  timeout "$lim" "$@" 2>&1 | tee -a "$log" | grep -E "^RESULT|target reached|resumed from|Error|error:"
  local rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || echo "RESULT FAILED $name: exit $rc$([[ $rc == 124 ]] && echo " (over ${lim}s)")" | tee -a "$log"
  echo "--- $name $((SECONDS - start)) s" | tee -a "$log"
}
wanted() { [[ " $steps_wanted " == *" $1 "* ]]; }

$py -c "import torch, transformers; print('RESULT versions: torch', torch.__version__, 'transformers',
  transformers.__version__, 'cuda', torch.version.cuda, 'device',
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$log"

if wanted train; then
  step train $py bench/train_throughput.py --model $big --batch $batch --block $block --device $dev \
    --precision $prec --compile --distill 20 --warmup 3 --steps $steps --repeats 1
fi

if wanted fsdp; then  # 4 steps with a checkpoint at 2 and 4, then resumed to 6
  fsdp="$py -m torch.distributed.run --nproc_per_node 1 -m scratchlm train --model $mid --strategy fsdp \
    --device $dev --precision $prec --block-size 256 --micro-batch-size $batch --eval-interval 1000 \
    --eval-batches 1 --checkpoint-interval 2 --log-interval 1 --out $work/fsdp-run"
  step fsdp bash -c "$fsdp --max-steps 4 && $fsdp --max-steps 6 --resume auto"
fi

if wanted distill; then  # the whole soft-label path on the device: prepare with a teacher, train on it in fp16
  step distill bash -c "set -e
    $py -c 'import sys; from scratchlm.model.config import get_preset; from scratchlm.model.hf import save_hf
from scratchlm.model.model import Phi; from scratchlm.tokenizer import load_tokenizer
save_hf(Phi(get_preset(\"phi-tiny\")), sys.argv[1]); load_tokenizer().save(sys.argv[1])' $work/teacher
    $py -m scratchlm prepare --data $book --teacher local:$work/teacher --soft-labels 20 --device $dev \
      --eval-fraction 0.05
    $py -m scratchlm train --model $mid --data $book --soft-labels 20 --distill-weight 0.5 --device $dev \
      --soft-label-teacher local:$work/teacher \
      --precision $half --block-size 256 --micro-batch-size $batch --max-steps 12 --warmup-steps 2 \
      --eval-interval 6 \
      --eval-batches 1 --eval-fraction 0.05 --log-interval 1 --out $work/distill-run
    grep -h 'tok/s' $work/distill-run/train.log | tail -1 | sed 's/^/RESULT distilled $half run ($mid): /'
    grep -h overflow_steps $work/distill-run/summary.json | sed 's/^ */RESULT distilled $half run: /'"
fi

if wanted target; then
  step target $py -m scratchlm train $target_args --target-loss auto --device $dev \
    --precision $prec --out "$work/target-run"
fi

if wanted gen; then  # sampled at the teacher's settings (T 0.8, top-p 0.95) and greedy; logprobs; scoring
  step gen $py bench/gen_throughput.py --model $big $gen_args --device $dev --repeats 2 --logprobs 20
fi

if wanted parity && [[ $dev == cuda ]]; then
  step parity $py -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
fi

echo
echo "===== gpu_check summary ($dev) =====" | tee "$out/gpu_check_table.txt"
{ grep -E "^RESULT" "$log" | sed 's/^RESULT //'
  grep -E "^[0-9]+ (passed|failed)" "$log" | tail -1 | sed 's/^/parity: /'
  grep -h "target reached" "$log" | tail -1
  grep -h "resumed from" "$log" | tail -1 | sed 's/^.*resumed/fsdp ws1: resumed/'
  grep -h "tok/s" "$work/fsdp-run/train.log" 2>/dev/null | tail -1 | sed 's/^/fsdp ws1: /'
} | tee -a "$out/gpu_check_table.txt"
for run in fsdp distill target; do [[ -f $work/$run-run/train.log ]] && cp "$work/$run-run/train.log" "$out/$run-train.log"; done
rm -rf "$work"
