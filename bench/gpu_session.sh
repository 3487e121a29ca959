#!/usr/bin/env bash
# Every GPU check of a lent device session, in one command (../shared/DEVICE.md): the device
# has torch but not soulray's other dependencies and no network, so they travel as wheels.
#
# Here (CPU, once):
#   .venv/bin/python bench/train_gpu.py prepare --out bench/gpu-data   # packed rows, seq 4096
#   wheels into .whl/ (the device has torch, numpy, pyarrow, pyyaml, tokenizers, safetensors):
#   P="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:"
#   pip download $P -d .whl transformers==5.25.0 huggingface_hub==2.4.0 kernels==0.19.1 \
#       pydantic==2.14.4 tensorboardX==2.6.5      # then delete numpy, pyyaml, tokenizers,
#   pip download --no-deps -d .whl peft==0.21.2   # safetensors (the device's are used)
# On the device (carry .whl and bench/gpu-data):
#   bash bench/gpu_session.sh            # writes its results under $OUT (default bench/results/gpu)
#
# Stages, each bounded by its own timeout so one failure does not take the others with it:
#   env      torch, CUDA, the attention kernels there
#   pytest   the tests marked gpu
#   speed    Qwen2.5-1.5B shape, seq 4096, 2 rows/step, FSDP2 bf16: varlen, then sdpa
#   memory   the measured peak against bench/train_memory.py's estimate: 1.5B with activation
#            checkpointing, 1.5B without the chunked loss
#   export   Qwen2.5-0.5B shape, 4 steps, with the loop's final checkpoint and export
#   lora-7b  Qwen2.5-7B LoRA r16 (4 x 4096 tokens), estimate against measured, if time is left
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee "$OUT/session.log") 2>&1
PY=${PY:-python3}
T0=$(date +%s)
stage() { echo "=== $1 at +$(($(date +%s) - T0)) s"; }

stage env
$PY - <<'EOF' | tee "$OUT/env.txt"
import importlib.util, torch, transformers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("varlen", importlib.util.find_spec("torch.nn.attention.varlen") is not None)
print("flash_sdp", torch.backends.cuda.flash_sdp_enabled(), "cudnn_sdp", torch.backends.cuda.cudnn_sdp_enabled())
print("flash_attn", importlib.util.find_spec("flash_attn") is not None)
EOF

if [ -z "${SKIP_PYTEST:-}" ]; then
    stage pytest
    timeout 120 $PY -m pytest -m gpu tests/train/test_train_model.py -q -p no:cacheprovider -x \
        2>&1 | tail -15
fi

# Each run gets what is left of BUDGET seconds (at most 180); none starts in its last 60.
BUDGET=${BUDGET:-390}
run() {
    local left=$((BUDGET - ($(date +%s) - T0)))
    stage "$1"
    if [ $left -lt 60 ]; then echo "skipped: $left s left of $BUDGET"; return; fi
    [ $left -gt 180 ] && left=180
    shift
    timeout $((left + 10)) $PY bench/train_gpu.py run --data bench/gpu-data --timeout $left "$@" \
        | tail -32
}
STOP=--stop-after-last-step
run speed-varlen --shape qwen2.5-1.5b --kernels varlen --steps ${SPEED_STEPS:-30} --warmup 8 --log-every 4 $STOP \
    --out "$OUT/speed_varlen.json"
run speed-sdpa --shape qwen2.5-1.5b --kernels sdpa --steps ${SPEED_STEPS:-30} --warmup 8 --log-every 4 $STOP \
    --out "$OUT/speed_sdpa.json"
run ckpt-1.5b --shape qwen2.5-1.5b --kernels varlen --activation-checkpointing --steps 10 \
    --warmup 4 --log-every 2 --tag=-ckpt $STOP --out "$OUT/mem_ckpt.json"
run nochunk-1.5b --shape qwen2.5-1.5b --kernels varlen --loss-chunk 0 --steps 10 --warmup 4 \
    --log-every 2 --tag=-nochunk $STOP --out "$OUT/mem_nochunk.json"
run export-0.5b --shape qwen2.5-0.5b --kernels varlen --steps 4 --warmup 1 --log-every 2 \
    --tag=-export --out "$OUT/export.json"
run lora-7b --shape qwen2.5-7b --kernels varlen --lora-r 16 --batch 4 --activation-checkpointing \
    --steps 6 --warmup 2 --log-every 2 --tag=-lora16 $STOP --out "$OUT/mem_lora7b.json"
stage done
