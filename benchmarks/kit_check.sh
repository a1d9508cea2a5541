#!/usr/bin/env bash
# Before device time is spent: does the GPU kit (.whl/, from gpu_kit.sh) work on the GPU machine's Python and
# packages? This builds a stand-in of that machine here, without a GPU: Python 3.12, torch 2.11.0 (the CUDA
# build, run on the CPU) and the versions the machine was seen with (device library, KINDS.md), then does
# what gpu_check.sh does first (the kit installed with --no-deps into a --target folder on PYTHONPATH) and
# runs, on the CPU, the paths the check will take: the imports, a short training run, the collection of the
# GPU tests and a short benchmark against TRL with its targets table. Timings from it mean nothing.
#
#   bash benchmarks/kit_check.sh            # needs a package registry, python3.12 and ~4 GB of disk
#
# Packages the machine has whose version was not seen (pandas, pyarrow, ...) are installed at their newest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-$(command -v python3.12)}
VENV=${VENV:-/tmp/kit-check-venv}
SITE=${SITE:-/tmp/kit-check-site}
WORK=$(mktemp -d /tmp/kit-check.XXXXXX)
ls .whl/*.whl >/dev/null || { echo "no .whl/: run bash benchmarks/gpu_kit.sh first"; exit 1; }

[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 accelerate==1.15.0 huggingface_hub==1.33.0 numpy==2.5.2 \
    safetensors==0.8.0 tokenizers==0.23.2 transformers==5.17.0 \
    einops filelock fsspec jinja2 msgpack ninja nvidia-ml-py pandas psutil py-cpuinfo pyarrow pytest \
    pytest-timeout pyyaml regex requests tqdm xxhash
rm -rf "$SITE"
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH=$SITE:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled
py="$VENV/bin/python"

$py -c "
import torch, transformers, accelerate, hydra, omegaconf, trl, datasets, deepspeed, peft, liger_kernel.chunked_loss
print('imports: torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__,
      'datasets', datasets.__version__, 'deepspeed', deepspeed.__version__, 'hydra', hydra.__version__)"
fail() { echo "kit check FAILED: $1 (logs in $WORK)"; exit 1; }
(cd "$WORK" && $py -m simpo_exp max_steps=4 logger=none hydra.run.dir="$WORK/run" > train.log 2>&1) || fail "training run"
echo "training run: ok ($(grep -c . "$WORK/run/metrics.jsonl") metric rows)"
$py -m pytest -q -p no:cacheprovider -o addopts="" --timeout=100 \
    tests/test_liger.py::test_compiled_fused_head_on_cuda tests/test_gpu.py > "$WORK/tests.log" 2>&1 || fail "GPU tests"
echo "GPU tests collected: $(tail -n 1 "$WORK/tests.log")"
# hardware.fused_layers=liger patches through transformers' Liger integration: the kit's pair of versions, checked
# for what it patches in each family (the kernels themselves need the GPU)
$py -m pytest -q -p no:cacheprovider -o addopts="" tests/test_fused_layers.py > "$WORK/fused.log" 2>&1 \
    || fail "Liger layer patching"
echo "Liger layer patching: $(tail -n 1 "$WORK/fused.log")"
$py benchmarks/bench_trl.py --preset cpu --variants plain,prefix,plain+liger --rounds 1 --steps 3 --warmup 1 \
    --json "$WORK/bench.json" > "$WORK/bench.log" 2>&1 || fail "benchmark against TRL"
echo "benchmark against TRL: ok"
$py benchmarks/targets.py "$WORK/bench.json" > "$WORK/targets.log" 2>&1 || fail "targets table"
echo "targets table: ok"
echo "kit check passed (logs in $WORK)"
