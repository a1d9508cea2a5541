#!/usr/bin/env bash
# Wheels for a bare, offline GPU machine that already has Python 3.12 with torch, transformers,
# accelerate, peft, pyarrow and pandas (the lent device image; see /work/.library/device): what
# simpo-exp and its benchmarks still need, downloaded (or built, for source-only packages) into .whl/.
#
#   bash benchmarks/gpu_kit.sh                      # here, with a package registry reachable
#   # there, in the repository root, with .whl carried along:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 benchmarks/bench_scale.py --preset gpu
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && touch .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl

PY312=(--only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# The versions tested here, pinned so that they agree there: transformers and peft (the image has others),
# Hydra with the omegaconf it accepts (hydra-core 1.3.x refuses omegaconf 2.4), the data stack, and the
# TRL release the benchmark compares with.
PINNED=$(python3 -c "
from importlib.metadata import version as v
names = ('transformers', 'peft', 'hydra-core', 'omegaconf', 'datasets', 'dill', 'multiprocess', 'pydantic',
         'pydantic-core', 'annotated-types', 'typing-inspection', 'xxhash')
print(' '.join(f'{p}=={v(p)}' for p in names))")
# The image's huggingface_hub (1.33.0, device library KINDS.md) is kept: a newer one needs packages it lacks (hub 2.x
# brings httpx2). transformers from 5.25 asks for hub >= 2.4 and refuses to import under 1.33, so where the version
# tested here does, the kit takes the newest release seen to accept 1.33 (5.24.0, checked 2026-12-04), and says so.
IMAGE_HUB=1.33.0 FOR_IMAGE_HUB=5.24.0
PINNED=$(python3 - "$PINNED" "$IMAGE_HUB" "$FOR_IMAGE_HUB" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
pinned, hub, fallback = sys.argv[1].split(), sys.argv[2], sys.argv[3]
wants = [Requirement(r) for r in requires("transformers") if r.startswith("huggingface-hub")]
if wants and not wants[0].specifier.contains(hub):
    local = next(p for p in pinned if p.startswith("transformers=="))
    print(f"gpu_kit: {local} needs {wants[0]}, the image has huggingface_hub {hub}: the kit takes "
          f"transformers=={fallback}", file=sys.stderr)
    pinned = [f"transformers=={fallback}" if p == local else p for p in pinned]
print(" ".join(pinned))
PY
)
# liger-kernel: pure Python (its kernels are Triton, which the image's torch brings) for hardware.fused_head=liger
python3 -m pip download -q --no-deps "${PY312[@]}" -d .whl $PINNED trl==1.16.0 hjson==3.1.0 liger-kernel==0.8.5
# source-only on PyPI: built here as pure-Python wheels (DeepSpeed compiles its ops on first use there); DeepSpeed
# at the version the test extra pins (pyproject.toml)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl \
    antlr4-python3-runtime==4.9.3 deepspeed==0.19.8
du -sh .whl && ls .whl
