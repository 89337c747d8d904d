#!/usr/bin/env bash
# The one GPU check, for a session that is lent a CUDA machine (the device tool's `run`). Run from anywhere:
#
#   bash tools/gpu_check.sh             everything, about 7.5 minutes on one H200 (every step has a timeout,
#                                       and none runs past 470 s from the start, so the whole ends within 8 min)
#   bash tools/gpu_check.sh --dry-run   print every step with its exact command and timeout, every pytest node
#                                       id and every bench entry it would run; runs nothing, needs no GPU
#   bash tools/gpu_check.sh --also NAME also bench the entries whose name contains NAME on SDXL (repeatable), e.g.
#                                       --also torch.compile (the diffusers compile peer: minutes of compiling,
#                                       past the 8 minutes) or --also documented (diffusers' documented settings)
#
# What it runs, in this order:
#   1. versions and preflight: torch, CUDA, the GPU, diffusers, transformers; stops if an import is missing
#   2. diffspeed presets --probe: the hardware class the presets resolve to (bf16/fp16 against fp32, timed)
#   3. pytest -m gpu over every test file with a gpu mark (tests/gpu: fp16/bf16, TF32, SDPA, offload, compile,
#      quantize on tiny-sd; and the gpu tests beside the CPU ones in tests/optim, tests/presets, tests/bench)
#   4. diffspeed bench --model random:sdxl --size 1024 --steps 30: the baseline, every preset and the CUDA-only
#      peers (diffusers' model CPU offload), 1 warm-up + 1 timed image each, one process per entry
#   5. diffspeed bench --model tiny-sd: every preset against the baseline with fidelity (trained weights)
#
# Preparing the lent machine. Its image (/work/.library/device/KINDS.md) has torch, transformers, peft,
# accelerate, safetensors, scipy, scikit-image, matplotlib and pytest, but not diffusers, pydantic or torchao,
# and nothing can be downloaded there: they travel as wheels. Once, here, in the repo root (the versions of this venv):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       $(python3 -m pip freeze | grep -iE '^(diffusers|torchsde|trampoline|tomli[-_]w|sd[-_]parsers|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions|torchao)==')
# (about 13 MB; torchao is for quantize's int8 methods: without it their tests skip, saying so). Then, with the
# device tool (under 8 minutes of the session's device time plus the machine's start; give it back after):
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The wheels are installed into /tmp/site there (not on this machine), and src/ and models/src/ go first on
# PYTHONPATH, so this checkout's diffspeed and its shipped models are what runs.
#
# What it writes, under $OUT on the device (what comes back: at most 8 files, 2 folders down), or gpu-out/ here:
#   gpu-check.log                      everything printed, each step's exit status and seconds, and a summary
#   pytest-gpu.txt                     the pytest run (skip reasons and slowest tests included)
#   benchmarks/gpu-DATE-random-sdxl-1024/{results.json,report.md}  the SDXL bench (DATE: UTC, YYYYMMDD)
#   benchmarks/gpu-DATE-tiny-sd-cuda/{results.json,report.md}      the tiny-sd bench
#   bench-folders.tar.gz               both report folders whole (report.html, plots, grids, every entry's log
#                                      and result), as benchmarks/<name>/..., also when a bench was cut short
# The benches write their folders into this checkout's benchmarks/ (on the device: its copy of the tree). The
# lead copies what came back into the repository: `tar -xzf <files_at>/bench-folders.tar.gz` in the repo root
# gives benchmarks/gpu-DATE-*/ as committed reports are laid out; add a line for them in benchmarks/README.md.
set -uo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

dry=0
also=()
while (($#)); do
    case $1 in
        -n | --dry-run) dry=1 ;;
        --also) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --also needs a NAME" >&2; exit 2; }; also+=("$2"); shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
py=${PYTHON:-python3}
out=${OUT:-gpu-out}
day=$(date -u +%Y%m%d)
sdxl_name=gpu-$day-random-sdxl-1024
tiny_name=gpu-$day-tiny-sd-cuda
deadline=${GPU_CHECK_DEADLINE:-470}  # seconds from the start: no step runs past it, so the whole stays under 8 min
work=${TMPDIR:-/tmp}/diffspeed-gpu-check
export DIFFSPEED_CACHE_DIR=${DIFFSPEED_CACHE_DIR:-$work/cache}  # the probe of step 2, reused by the later steps
export PYTHONPATH=$PWD/src:$PWD/models/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# The CUDA-only peers, chosen through the bench CLI's --only (a peer entry is named after the call it makes):
# diffusers' enable_model_cpu_offload (and enable_sequential_cpu_offload, should it join the default peers).
cuda_peers=(cpu_offload)
# CUDA-only peers left out on purpose, and why: the diffusers compile peer (reduce-overhead, fullgraph) spends
# minutes compiling SDXL's UNet in inductor, more than the 8 minutes hold.
left_out=("torch.compile=minutes of inductor compile on SDXL at 1024²; --also torch.compile adds it")

pytest_files() {  # every test file with a gpu mark, as a decorator or a module-level pytestmark
    grep -rlE '^[[:space:]]*(@pytest\.mark\.gpu|pytestmark\b.*pytest\.mark\.gpu)' tests --include='test_*.py' | sort
}
mapfile -t gpu_files < <(pytest_files)

pytest_cmd=("$py" -m pytest -q -m gpu -p no:cacheprovider -ra --durations=8 "${gpu_files[@]}")
# SDXL 1024², 30 steps, 1 warm-up + 1 timed image per entry: on an H200 about 2-3 s an image in fp16, 3x that for
# the fp32 baseline, ~10x with sequential offload, plus ~12 s to start each entry's process. An entry past 90 s
# is recorded as failed and the bench goes on. The plugin builds the random weights on the GPU (see its docstring).
sdxl_cmd=("$py" -m diffspeed bench --model random:sdxl --size 1024 --steps 30 --device cuda --preset all --peers
          --only preset)
for name in "${cuda_peers[@]}" ${also[@]+"${also[@]}"}; do sdxl_cmd+=(--only "$name"); done
sdxl_cmd+=(--prompts 1 --runs 1 --warmup 1 --timeout 90 --plugin tests/gpu/random_on_cuda.py
           --out "benchmarks/$sdxl_name" --quiet)
tiny_cmd=("$py" -m diffspeed bench --model tiny-sd --device cuda --preset all --no-peers --runs 3 --prompts 2
          --timeout 60 --out "benchmarks/$tiny_name" --quiet)
probe_cmd=("$py" -m diffspeed presets --probe)
preflight_cmd=("$py" "$work/preflight.py")

# each step: name, timeout (s), the least time worth starting it with (s), expected time on one H200 (s)
steps=("preflight 60 20 15" "probe 60 20 15" "pytest 150 60 100" "bench-sdxl 300 150 240" "bench-tiny-sd 120 60 70")

write_preflight() {
    cat >"$work/preflight.py" <<'PY'
import importlib.util
import sys

need = ["torch", "diffusers", "transformers", "accelerate", "safetensors", "peft", "scipy", "pydantic", "torchsde",
        "tomli_w", "skimage", "matplotlib", "pytest", "diffspeed", "diffspeed_models"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing: {', '.join(missing)} (bring them as wheels: see tools/gpu_check.sh --help)")
import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import diffspeed  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("no CUDA device: nothing to check here (tools/gpu_check.sh --dry-run shows what would run)")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, transformers "
      f"{transformers.__version__}, diffspeed {diffspeed.__version__}, python {sys.version.split()[0]}, torchao "
      f"{'present' if importlib.util.find_spec('torchao') else 'absent (int8 quantize tests skip)'}")
print(f"device {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
      f"{p.multi_processor_count} SMs")
PY
}

# ----------------------------------------------------------------------------------------------- dry run
list_presets() {  # the presets with the recipe each resolves to on a GPU with fast bf16 (an H100's or H200's class)
    "$py" -m diffspeed presets --profile cuda-bf16 | awk '
        /^(hardware|presets resolve|an NVIDIA)/ { next }
        /^[a-z0-9][a-z0-9-]*: / { name = substr($1, 1, length($1) - 1); next }
        /^ +recipe: / { sub(/^ +recipe: /, ""); printf "      preset %-13s [cuda-bf16] %s\n", name, $0 }'
}

list_peers() {  # list_peers CHOSEN... -- LEFT_OUT...: the default peers this run selects; a warning for a CUDA-only
    # one that no bench here selects (a peer added since), so the dry run's test fails until it is placed
    "$py" - "$@" <<'PY'
import sys

args = sys.argv[1:]
chosen, left_out = args[:args.index("--")], dict(a.split("=", 1) for a in args[args.index("--") + 1:])
try:
    from diffspeed.bench.peers import default_peers

    peers = default_peers()
except Exception as err:  # noqa: BLE001 -- a listing only: the bench itself selects through --only
    print(f"      (the peers could not be listed here: {type(err).__name__}: {err})")
    sys.exit(0)
for p in peers:
    cuda = " [CUDA only]" if p.cuda_only else ""
    if any(c in p.name for c in chosen):
        print(f"      peer {p.name}{cuda}")
    elif p.cuda_only:
        why = next((w for k, w in left_out.items() if k in p.name), None)
        print(f"      not run: peer {p.name}{cuda}: {why}" if why else
              f"      WARNING: CUDA-only peer {p.name!r} is in no bench of this script: add a part of its name to "
              "cuda_peers (or left_out) in tools/gpu_check.sh")
PY
}

dry_run() {
    local total=10 entry name limit least expect
    echo "tools/gpu_check.sh --dry-run: what a run does, in order (nothing runs here; no GPU needed)"
    echo "each step has a timeout; none starts with less than its minimum left, none runs past ${deadline} s"
    echo
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "[setup] ~10s: $py -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl ($(ls .whl | wc -l) wheels)"
    else
        echo "[setup] no .whl/ here: the device needs diffusers, pydantic, ... as wheels (see --help)"
    fi
    for entry in "${steps[@]}"; do
        read -r name limit least expect <<<"$entry"
        total=$((total + expect))
        echo
        echo "[$name] timeout ${limit}s (starts with >= ${least}s left), expected ~${expect}s"
        case $name in
            preflight)
                echo "    ${preflight_cmd[*]}: imports, versions, the CUDA device; the run stops here if one fails"
                echo "    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv" ;;
            probe) echo "    ${probe_cmd[*]}" ;;
            pytest)
                echo "    ${pytest_cmd[*]}"
                # pytest's own collection, on this CPU (the tests skip without a GPU, collecting them does not)
                "$py" -m pytest --collect-only -q -m gpu -p no:cacheprovider "${gpu_files[@]}" 2>&1 |
                    grep -E '::|collected|rror' | sed 's/^/      /' ;;
            bench-sdxl)
                echo "    ${sdxl_cmd[*]}"
                echo "    entries, one process each (--only keeps the presets and the chosen peers):"
                echo "      baseline [random weights in fp32, as every random: pipeline loads]"
                list_presets
                list_peers "${cuda_peers[@]}" ${also[@]+"${also[@]}"} -- "${left_out[@]}"
                echo "      baseline again [the run's timing noise]" ;;
            bench-tiny-sd)
                echo "    ${tiny_cmd[*]}"
                echo "    entries, one process each:"
                echo "      baseline [tiny-sd in fp16, the load dtype on a GPU]"
                list_presets
                echo "      baseline again [the run's timing noise]" ;;
        esac
    done
    echo
    echo "expected in all: ~${total} s on one H200 (deadline ${deadline} s); then the files of --help go to $out/"
}

if ((dry)); then
    dry_run
    exit 0
fi

# ------------------------------------------------------------------------------------------------- real run
summary=()
failed=0
run_step() {  # run_step NAME LOGFILE|- CMD...: CMD under the step's timeout, cut to end by the deadline
    local name=$1 file=$2 limit least expect left rc t0 status entry n
    shift 2
    for entry in "${steps[@]}"; do
        read -r n limit least expect <<<"$entry"
        [[ $n == "$name" ]] && break
    done
    left=$((deadline - SECONDS))
    ((left < limit)) && limit=$left
    if ((limit < least)); then
        echo "== $name: not run: ${left}s left before the ${deadline}s deadline; it needs ${least}s"
        summary+=("$(printf '%-14s %-10s %4s s  (expected ~%s s)' "$name" "not run" 0 "$expect")")
        failed=$((failed + 1))
        return 1
    fi
    echo "== $name (timeout ${limit}s, at ${SECONDS}s): $*"
    t0=$SECONDS
    if [[ $file == - ]]; then
        timeout -k 10 "$limit" "$@"
        rc=$?
    else
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$file"
        rc=${PIPESTATUS[0]}
    fi
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status="exit $rc" ;;
    esac
    ((rc)) && failed=$((failed + 1))
    echo "== $name: $status after $((SECONDS - t0))s"
    summary+=("$(printf '%-14s %-10s %4s s  (timeout %s s, expected ~%s s)' "$name" "$status" $((SECONDS - t0)) \
        "$limit" "$expect")")
    return "$rc"
}

collect() {  # what comes back from $OUT: two small files per bench, and both folders whole in one archive
    local name folders=()
    for name in "$sdxl_name" "$tiny_name"; do
        [[ -d benchmarks/$name ]] || continue
        folders+=("benchmarks/$name")
        mkdir -p "$out/benchmarks/$name"
        cp benchmarks/"$name"/results.json benchmarks/"$name"/report.md "$out/benchmarks/$name/" 2>/dev/null
    done
    if ((${#folders[@]})); then
        tar -czf "$out/bench-folders.tar.gz" "${folders[@]}"
    fi
    echo "files in $out: $(cd "$out" && find . -type f | sort | tr '\n' ' ')"
}

main() {
    mkdir -p "$work"
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || echo "warning: not every wheel installed (the preflight names what is missing)"
        export PYTHONPATH=$PWD/src:$PWD/models/src:/tmp/site:$PYTHONPATH
    fi
    write_preflight
    echo "gpu_check.sh at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), setup ${SECONDS}s"
    run_step preflight - "${preflight_cmd[@]}" || { echo "preflight failed: nothing else can run"; return 3; }
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -3
    run_step probe - "${probe_cmd[@]}"
    run_step pytest "$out/pytest-gpu.txt" "${pytest_cmd[@]}"
    run_step bench-sdxl - "${sdxl_cmd[@]}"
    run_step bench-tiny-sd - "${tiny_cmd[@]}"
    collect
    echo
    echo "summary (${SECONDS}s in all; a failed bench entry makes its step exit 1, see its report):"
    printf '  %s\n' "${summary[@]}"
    ((failed == 0))
}

mkdir -p "$out"
main 2>&1 | tee "$out/gpu-check.log"
exit "${PIPESTATUS[0]}"
