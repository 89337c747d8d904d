#!/usr/bin/env bash
# The one short GPU check, for a session that is lent a CUDA machine (the device tool's `run`), in the repo root.
#
# The device image has torch, transformers, peft, accelerate, safetensors, scikit-image and torchmetrics, but not
# diffusers or diffspeed's small pure-Python needs. Prepare them here once (they travel as wheels):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       'diffusers==0.42.*' torchsde trampoline tomli-w sd-parsers
# then: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# What it checks, in about 5 minutes: the hardware profile and probe (CUDA capability, bf16/fp16 vs fp32), every
# test marked gpu, and one bench of every preset on tiny-sd against the same-run baseline (results under $OUT).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/models/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import diffusers, torch
print("torch", torch.__version__, "diffusers", diffusers.__version__, "device", torch.cuda.get_device_name(0))
PY
python3 -m diffspeed presets --probe 2>&1 | tee "$out/presets.txt" | head -5
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt" | tail -15
timeout 240 python3 -m diffspeed bench --model tiny-sd --device cuda --preset all --no-peers --runs 3 --prompts 2 \
    --out "$out/bench-tiny-sd-cuda" --quiet 2>&1 | tail -30
cp "$out/bench-tiny-sd-cuda/results.json" "$out/bench-results.json" 2>/dev/null || true
