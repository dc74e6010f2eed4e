#!/usr/bin/env bash
# The GPU checks and benchmarks of the "Fast recurrences" issue, as one prepared run of at most
# about 9 minutes on a GPU machine: correctness first (tests/test_gpu.py: cuDNN LSTM, cuDNN attention,
# `jaxseq train` learning and resuming), then the figures the issue asks for, most wanted first:
#   1. GPT-2 small train step in bfloat16: MFU against the datasheet peak (target >= 50%), vs PyTorch;
#   2. causal attention, bfloat16, length 256..4096: jaxseq (cuDNN) vs PyTorch SDPA on CUDA;
#   3. LSTM layers, hidden 64/256/512: jaxseq (cuDNN dispatch), jaxseq's own fused path,
#      jax.experimental.rnn, Flax, PyTorch nn.LSTM (cuDNN);
#   4. the GPT step at the Transformer issue's size (4 layers, d 256, context 256), float32;
#   5. GPT-2 small in bfloat16 again, against torch.compile (whatever budget is left).
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh            # on the GPU machine; results go under OUT
#   GPU_SUITE_SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_suite.sh   # tiny sizes, any backend: checks the plumbing
#
# Needs only what a CUDA JAX + PyTorch image has (jax, flax, optax, orbax, torch, pytest): jaxseq is
# imported from this checkout, and nothing here uses tyro or datasets. Each stage gets what is left
# of GPU_SUITE_BUDGET_S (default 520 s) up to its own cap, so a slow stage cannot starve the rest of
# the run beyond its cap, and the whole run ends within 600 s. What it leaves under
# $OUT: suite.log (everything printed), tests.log, and the JSON lines of each stage; plots are redrawn
# elsewhere from those (`--replot`), so that only a few small files need to be copied back.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX takes 75% of GPU memory at start by default; PyTorch runs in the same processes
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET_S:-520}
SMOKE=${GPU_SUITE_SMOKE:-0}
exec > >(tee -a "$OUT/suite.log") 2>&1

# stage NAME CAP_S COMMAND...: run COMMAND with a timeout of min(CAP_S, what is left of the budget)
stage() {
  local name=$1 cap=$2 left
  shift 2
  left=$((BUDGET - SECONDS))
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s of the budget left"
    return
  fi
  ((cap > left)) && cap=$left
  echo "== $name (up to ${cap}s, at ${SECONDS}s)"
  timeout -s INT -k 10 "$cap" "$@"
  echo "== $name: exit $? after ${SECONDS}s"
}

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__,
'| optax', optax.__version__, '| torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [[ $SMOKE == 1 ]]; then
  gpt_big=(--layers 1 --heads 2 --d-model 32 --context 16 --batch 2 --vocab 65 --warmup 1 --repeats 3)
  attn=(--lengths 256 --batch 1 --heads 1 --repeats 3)
  rnn=(--layers lstm --hidden 16 --modes train --batch 4 --length 8 --d-in 8 --repeats 3 --warmup 1)
else
  gpt_big=(--layers 12 --heads 12 --d-model 768 --context 1024 --batch 8 --vocab 50304 --warmup 3 --repeats 10)
  gpt_small=(--d-model 256 --context 256 --batch 16 --repeats 10)
  attn=(--lengths 256 512 1024 2048 4096 --repeats 7)
  rnn=(--layers lstm --hidden 64,256,512 --repeats 7)
fi

# torch.compile's first call (inductor builds its kernels: a minute or more) would eat the first GPT
# stages' caps, so they run every competitor but that one, and the last stage runs it against jaxseq
# and the fused-AdamW eager form with the budget that is left (its rows name their run's best form).
gpt_impls=(--impls jaxseq,jaxseq-model-hand-step,flax-gpt,torch-eager,torch-eager-fused-adamw)
compile_impls=(--impls jaxseq,torch-eager-fused-adamw,torch-compile)

stage tests 180 $PY -m pytest -m gpu -q -rs -s tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
stage gpt2-small-bf16 200 $PY benchmarks/gpt_step.py "${gpt_big[@]}" "${gpt_impls[@]}" --compute-dtype bfloat16 --out "$OUT/gpu-gpt-step.jsonl"
stage attention-bf16 110 $PY benchmarks/attention_scaling.py "${attn[@]}" --dtype bfloat16 --no-torch-compile --out "$WORK/gpu-attention-bf16.jsonl"
cp "$WORK"/gpu-attention-bf16.jsonl "$OUT"/ 2>/dev/null
stage rnn-layers 130 $PY benchmarks/rnn_layers.py "${rnn[@]}" --out "$WORK/gpu-rnn-layers.jsonl"
cp "$WORK"/gpu-rnn-layers.jsonl "$OUT"/ 2>/dev/null
[[ $SMOKE == 1 ]] || stage gpt-4L-d256-f32 60 $PY benchmarks/gpt_step.py "${gpt_small[@]}" "${gpt_impls[@]}" --out "$OUT/gpu-gpt-step.jsonl"
stage gpt2-small-bf16-torch-compile 300 $PY benchmarks/gpt_step.py "${gpt_big[@]}" "${compile_impls[@]}" --compute-dtype bfloat16 --out "$OUT/gpu-gpt-step-compile.jsonl"
rm -rf "$WORK"
echo "== done after ${SECONDS}s; files: $(ls "$OUT" | tr '\n' ' ')"
