#!/usr/bin/env bash
# A second virtual environment for the bench peers whose packages cannot live beside diffspeed's own: optimum-intel
# 2.2.0 (FastSD CPU's OpenVINO engine, peer "openvino_pipeline") does not import with the transformers of diffspeed's
# environment (5.24: qwen2_vl's VisionRotaryEmbedding is gone). The bench runs such a peer's entry with this
# interpreter:
#
#   tools/peer_venv.sh [DIR]                      # default DIR: ~/.cache/diffspeed/peer-venv
#   DIFFSPEED_PEER_PYTHON=DIR/bin/python diffspeed bench --only openvino ...
#
# diffspeed and diffspeed-models are installed editable from this checkout, so the peer's worker runs this very
# code (the bench also puts this checkout's src/ first on the worker's PYTHONPATH). PYTHON picks the interpreter
# the environment is made from (default python3; the same minor version as diffspeed's environment is best).
set -euo pipefail

dir=${1:-${DIFFSPEED_PEER_VENV:-$HOME/.cache/diffspeed/peer-venv}}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

"${PYTHON:-python3}" -m venv "$dir"
"$dir/bin/python" -m pip install -q --upgrade pip
# torch 2.13.0: the CPU build from the local wheels, the same as diffspeed's environment. optimum-intel 2.2.0 declares
# transformers>=4.51,<5.6 and huggingface-hub<1.22, which diffusers 0.42 (diffspeed's) rules out: it needs
# huggingface-hub>=1.32, and optimum-intel imports diffusers' LTX2 pipelines, which import transformers'
# Gemma4UnifiedForConditionalGeneration (transformers>=5.10). transformers 5.10-5.14 has both that and the qwen2_vl
# VisionRotaryEmbedding optimum-intel imports (gone by 5.18); 5.10.1 is the oldest. So optimum-intel goes in without
# its declared dependencies, and they (its [openvino] extra: optimum~=2.3, openvino, openvino-tokenizers, nncf) with
# those versions. torchvision (declared, used by none of the Stable Diffusion export) is left out: PyPI's build would
# not match the local CPU torch. The last step imports OVStableDiffusionPipeline, so an environment where that fails
# is reported here, not in the bench.
"$dir/bin/python" -m pip install -q \
    "torch==2.13.0" \
    "diffusers==0.42.1" \
    "transformers==5.10.1" \
    "optimum~=2.3.0" "openvino>=2026.0" "openvino-tokenizers>=2026.0" "nncf>=3.3.0" "requests>=2.33,<3" setuptools \
    -e "$repo/models" -e "$repo"
"$dir/bin/python" -m pip install -q --no-deps "optimum-intel==2.2.0"

"$dir/bin/python" - <<'EOF'
import importlib.metadata as md

from optimum.intel import OVStableDiffusionPipeline  # noqa: F401 -- the import the peer needs

import diffspeed.bench.worker  # noqa: F401

print("peer environment ready:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "diffusers", "transformers", "optimum-intel", "openvino", "diffspeed")))
EOF
echo "use it with: export DIFFSPEED_PEER_PYTHON=$dir/bin/python"
