#!/usr/bin/env bash
# The GPU checks of this project, for a lent GPU machine (minutes of device time): run from the repository root
# there with the bundle of bench/gpu_bundle.py carried beside the working tree (.gpu/). Each step is bounded so the
# whole script ends inside BUDGET seconds (default 540), and one failing step does not stop the next:
#   env          GPU, torch and every package the later steps import (fails if one does not import)
#   tests        the GPU-only tests: packed attention on torch's varlen flash kernel against the dense mask and, in
#                a tiny MoRE model, against each sample alone; adapters injected into a base already on the GPU
#   kernels      bench/packed_attention_kernels.py: varlen vs per-sample vs dense-mask attention, one layer
#   vs_trl_135m  bench/vs_trl.py, 1 process (ZeRO-3 of one; 2 ranks need 2 GPUs): MoRE, plain LoRA and TRL's packed
#                SFTTrainer on a randomly initialised model of SmolLM2-135M's shape (step times do not depend on the
#                weights): tokens/s and MFU against the GEMM peak measured there
#   vs_trl_1b    the same on a random ~1B Llama
# Results land in $OUT (the device tool's folder; runs/gpu-check otherwise): summary.txt, env.txt, the JSONs (each
# rewritten after every system) and logs.tgz (after every step).
#
#   device run: bash bench/gpu_check.sh        (carry: .gpu)
#   STEPS="env tests" runs only those steps; PY=python (default python3) picks the interpreter; NO_INSTALL=1 uses
#   its packages as they are (no bundle).
set -u
PY=${PY:-python3}
OUT=${OUT:-runs/gpu-check}
BUDGET=${BUDGET:-540}
STEPS=${STEPS:-env tests kernels vs_trl_135m vs_trl_1b}
mkdir -p "$OUT" runs/gpu/logs
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
summary="$OUT/summary.txt"
: >"$summary"

step() {  # step NAME SECONDS CMD...: run with at most SECONDS (and what is left of BUDGET), log, record rc
  local name=$1 limit=$2
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local left=$((BUDGET - SECONDS - 20))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "$name: skipped (budget spent)" | tee -a "$summary"
    return
  fi
  local t0=$SECONDS log="runs/gpu/logs/$name.log"
  # its own session, so that a step out of time stops with everything it started (the trainer finishes its step
  # on SIGTERM and a benchmark's worker processes would outlive a plain `timeout`)
  setsid "$@" >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && ((SECONDS - t0 < limit)); do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "[gpu_check] $name: out of time after $limit s" >>"$log"
    kill -TERM -- "-$pid" 2>/dev/null
    for _ in $(seq 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null
  fi
  wait "$pid"
  local rc=$?
  kill -KILL -- "-$pid" 2>/dev/null  # whatever the step left running
  echo "$name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$summary"
  tail -n 4 "$log" | sed 's/^/    /' | tee -a "$summary"
  # every step's logs so far, the benchmarks' own per-system logs included (a run cut short keeps them)
  tar -czf "$OUT/logs.tgz" -C runs/gpu logs $(cd runs/gpu && ls -d vs-trl-*/full/*.log 2>/dev/null)
}

if [ -z "${NO_INSTALL:-}" ]; then
  if [ ! -d .gpu/wheels ]; then
    echo "no .gpu/ bundle: run bench/gpu_bundle.py here first and carry .gpu" | tee -a "$summary"
    exit 2
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl >runs/gpu/logs/pip.log 2>&1 || { tail runs/gpu/logs/pip.log; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ ! -d ../shared/data/glue ]; then  # where configs/prep/glue.yaml reads it
  mkdir -p ../shared/data && cp -r .gpu/glue ../shared/data/glue
fi

cat >runs/gpu/env.py <<'PYEOF'
import importlib
import inspect
import sys

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available()
      else "no GPU")
failed = []
for name in ("transformers", "tokenizers", "huggingface_hub", "accelerate", "peft", "trl", "datasets", "pyarrow",
             "fsspec", "deepspeed", "bitsandbytes", "pydantic", "sentencepiece", "tensorboard", "PIL", "pandas",
             "xxhash", "einops", "msgpack", "scipy", "yaml", "tqdm", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # the log says which one is missing or broken
        print(name, "FAILED:", repr(e))
        failed.append(name)
from torch.nn.attention.varlen import varlen_attn  # noqa: E402

print("varlen_attn", inspect.signature(varlen_attn))
sys.exit(f"imports failed: {failed}" if failed else 0)
PYEOF
step env 60 bash -c "nvidia-smi; $PY runs/gpu/env.py"
cp runs/gpu/logs/env.log "$OUT/env.txt" 2>/dev/null

step tests 120 $PY -m pytest -q -p no:cacheprovider --noconftest -rs tests/test_packed_attention.py \
  tests/test_more_model.py -k "(varlen or packed or cuda) and not compiled"
step kernels 60 $PY bench/packed_attention_kernels.py --device cuda --out "$OUT/packed_attention_cuda.json"

VS_TRL="bench/vs_trl.py --systems ours_1p_more,ours_1p_lora,trl_packed --order given --rows-per-step 16 \
  --trl-micro-rows 4 --eval-every 4"
step vs_trl_135m 240 bash -c "$PY bench/random_model.py --like .gpu/smollm2 --out runs/gpu/smollm2-shape \
    --hidden 576 --intermediate 1536 --layers 30 --heads 9 --kv-heads 3 &&
  $PY $VS_TRL --model runs/gpu/smollm2-shape --tokens 131072 --work runs/gpu/vs-trl-135m \
    --out $OUT/vs_trl_135m_gpu.json"
step vs_trl_1b 240 bash -c "$PY bench/random_model.py --like .gpu/smollm2 --out runs/gpu/random-llama-1b &&
  $PY $VS_TRL --model runs/gpu/random-llama-1b --tokens 65536 --work runs/gpu/vs-trl-1b \
    --out $OUT/vs_trl_1b_gpu.json"
echo "done in $SECONDS s" | tee -a "$summary"
