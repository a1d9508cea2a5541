#!/usr/bin/env bash
# The GPU check in two device calls, on one H100/H200: install the kit carried in .whl/, run tests/test_gpu.py,
# then the side-by-side benchmark against TRL 1.16 CPOTrainer(loss_type="simpo") at batch 16 (the MFU candidates)
# and at a batch TRL cannot fit; then, in a second call while the machine is warm, batch 4 and the compiled batch-16
# run. Figures (JSON, markdown tables, logs) go to $OUT. On the H200 (2026-12-04) the machine's start took about
# 30 s, the kit's install about 12 s, and the parts about what their limits say (below).
#
#   here:  bash benchmarks/gpu_kit.sh                        # wheels into .whl/ (needs a package registry)
#   there: bash benchmarks/gpu_check.sh                       # tests, b16, big: about 7.5 minutes (140 + 180 + 120 s)
#          PARTS="b4 compile16" bash benchmarks/gpu_check.sh  # the second call, at once: about 5.5 minutes
#          LIMIT_compile16=240 PARTS=compile16 bash ...        # a benchmark part's time limit, in seconds, changed
#
# Parts, in the order they run: tests, b16, big, profile, layers, b4, compile4, trlaccum, compile16, ckpt, blockmask,
# flex (profile, layers, compile4, trlaccum, compile16, ckpt, blockmask and flex only when PARTS names them; b4 only
# with time left of the 460 s,
# unless PARTS names it). Each part has its
# own time limit, and the benchmark prints and writes whatever it measured when it is cut short, so a slow part
# never costs the figures of the others. Then paste $OUT/summary.md into benchmarks/RESULTS.md's GPU section.
#
# The device tool brings back at most 8 files from $OUT, so the parts write into a work folder and, after
# each part, $OUT gets summary.md, bench.json (every part's benchmark JSON, by file name: bench-b16, ...) and
# one logs.tar.gz of everything (logs, markdown tables, the JSON files): 3 files however many parts ran, and a
# check cut short still leaves the parts it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
DEFAULT_PARTS="tests b16 big"  # b4 runs after these when time is left, or when named
PARTS=${PARTS:-$DEFAULT_PARTS}
want() { [[ " $PARTS " == *" $1 "* ]]; }
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
mkdir -p "$OUT"
KNOWN_PARTS="tests b16 big profile layers b4 compile4 compile16 trlaccum ckpt blockmask flex"
for part in $PARTS; do  # a misspelt part ran nothing, after the machine's start and the kit's install, and said "done"
    if [[ " $KNOWN_PARTS " != *" $part "* ]]; then
        echo "PARTS=\"$PARTS\": no part $part (the parts: $KNOWN_PARTS)" | tee "$OUT/summary.md"
        exit 1
    fi
done
started=$(date +%s)
log() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$WORK/summary.md"; }
publish() {  # three files, whatever the parts: the device tool brings back at most 8
    cp "$WORK/summary.md" "$OUT/" 2>/dev/null
    python3 -c "
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
merged = {}
for f in sorted(work.glob('*.json')):
    try:
        merged[f.stem] = json.loads(f.read_text())
    except ValueError:  # a part cut off while writing it
        merged[f.stem] = {'unreadable': f.read_text()[-2000:]}
pathlib.Path(sys.argv[2]).write_text(json.dumps(merged, indent=1))
" "$WORK" "$OUT/bench.json" 2>/dev/null
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" . 2>/dev/null
    return 0
}
trap publish EXIT
# the device's copy of the tree may come without .git: COMMIT=<hash> on the device command names the commit then
export COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $COMMIT" > "$WORK/summary.md"
if ! [[ "$COMMIT" =~ ^[0-9a-f]{7,40}(\+dirty)?$ ]]; then  # figures of code no one can name: said at the top
    echo "WARNING: commit '$COMMIT' is not a commit hash: re-run as COMMIT=\$(git rev-parse --short HEAD) bash $0" \
        | tee -a "$WORK/summary.md"
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "kit install failed" | tee -a "$WORK/summary.md"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD  # a machine that has the packages already (pip install -e ".[test,bench]")
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# Without the kit (or the packages installed) every part would fail at its imports and spend the device's
# minutes on empty output: stop here, saying what is missing.
if ! missing=$(python3 -c "
import importlib.util as u
names = 'hydra omegaconf trl datasets accelerate peft transformers simpo_exp'.split()
print(' '.join(n for n in names if u.find_spec(n) is None))" 2>&1) || [ -n "$missing" ]; then
    echo "not installed: ${missing:-?}; build the kit here first (bash benchmarks/gpu_kit.sh, then carry .whl)" \
        | tee -a "$WORK/summary.md"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$WORK/summary.md"
python3 -c "
import torch, transformers, accelerate, hydra, omegaconf, trl
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, '
      f'accelerate {accelerate.__version__}, hydra {hydra.__version__}, omegaconf {omegaconf.__version__}, trl {trl.__version__}')
" 2>&1 | tee -a "$WORK/summary.md"
# the machine's own packages that the kit relies on and benchmarks/kit_check.sh could only guess (never read there)
python3 -c "
from importlib import metadata
names = 'python3 pyarrow pandas fsspec regex tqdm pyyaml psutil einops triton flash-attn'.split()
def version(n):
    if n == 'python3':
        import platform; return platform.python_version()
    try: return metadata.version(n)
    except metadata.PackageNotFoundError: return 'absent'
print('machine packages: ' + ', '.join(f'{n} {version(n)}' for n in names))
" 2>&1 | tee -a "$WORK/summary.md"

if want tests; then
    log "tests/test_gpu.py and the CUDA tests of tests/test_liger.py"
    # Each test's result as it ends (so a part cut off still says how far it got); where pytest-timeout is
    # installed (the device image has it), no single test may take more than 80 s; where pytest-xdist is (the
    # device image has it too), 6 tests at a time. The whole training runs (38-50 s each on the H200, 2026-11-30)
    # are listed first, so that they start at once instead of after the quick numerics tests; the two that share
    # one run (the gpu_run fixture) are one xdist group, so it is trained once. Left out: the compiled-layers run,
    # still compiling at 190 s on 2026-11-30 (compiled loss and gradients are tested on the CPU, tests/test_compile.py,
    # and the compiled layers timed in b16). 2026-12-04: 110 s ran 21 of the 26 to the end (19 passed, 2 skipped:
    # flash-attn and vLLM absent); the five cut off build the most kernels (Gemma-2's softcapped and 256-wide heads,
    # the compiled Liger head, the 400-token packed FlexAttention case), so they now come right after the training
    # runs, and the part has 140 s. tests/conftest.py runs test_gpu.py's tests before test_liger.py's, so the two
    # Liger tests still come after test_gpu.py's slow five.
    extra=(); python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=80)
    # --no-loadscope-reorder: xdist hands the units out in the order given, one to each worker first (reordered by
    # size, the two-test group went first and a worker took two training runs in a row); tests/conftest.py keeps
    # test_gpu.py's tests first and in this order.
    python3 -c "import xdist" 2>/dev/null && extra+=(-n 6 --dist loadgroup --no-loadscope-reorder)
    g=tests/test_gpu.py
    TORCHINDUCTOR_COMPILE_THREADS=4 timeout -k 10 140 python3 -m pytest -v -p no:cacheprovider -o addopts="" "${extra[@]}" \
        $g::test_gpu_preset_runs_in_bf16_and_reports_mfu_and_memory $g::test_gpu_preset_resumes_with_its_measured_layout \
        $g::test_flex_attention_trains_through_the_loop $g::test_liger_layer_kernels_train_through_the_loop \
        $g::test_zero3_without_a_launcher $g::test_fsdp2_takes_the_fixed_gpu_layout_and_steps_adamw_fused $g::test_gpu_lora \
        $g::test_gemma2_9b_wide_heads_train_through_packed_flex_in_bf16_on_cuda \
        $g::test_gemma2_softcapped_flex_matches_the_plain_eager_layout_on_cuda $g::test_packed_layouts_match_the_plain_one_on_cuda \
        $g::test_a_packed_flex_step_never_makes_the_host_wait_on_cuda $g::test_partial_and_offloaded_checkpointing_on_cuda \
        $g::test_liger_layer_kernels_match_the_plain_path_on_cuda \
        tests/test_liger.py::test_compiled_fused_head_on_cuda tests/test_liger.py::test_fused_head_on_packed_flex_rows_on_cuda \
        $g::test_flash_varlen_matches_the_plain_layout_on_cuda $g::test_generate_stage_with_vllm > "$WORK/tests.log" 2>&1
    code=$?
    # -v lines end in PASSED/FAILED/SKIPPED/ERROR; pytest's "ERROR at setup of" section headers are not counted
    count() { grep -E " $1( |$)" "$WORK/tests.log" | grep -vcE "$1 at (setup|teardown) of"; }
    # how many were collected ("6 workers [25 items]", or "collected 25 items"): a test cut off reports nothing
    total=$(grep -oE "(workers \[|collected )[0-9]+ items?" "$WORK/tests.log" | grep -oE "[0-9]+" | head -1)
    log "tests: exit $code -- $(count PASSED) passed, $(count FAILED) failed, $(count ERROR) errors, $(count SKIPPED) skipped, of ${total:-?} collected"
    sleep 5  # a training child cut off with the part finishes its step and checkpoint before b16 starts
    publish
fi

gpu_idle() {  # before a benchmark part: no process of an earlier part may still hold the GPU
    # torch elastic starts a test's training workers in sessions of their own, which timeout's kill of the tests
    # part does not reach: one that outlived its part would share the GPU with the benchmark. Wait for such
    # processes (10 s at most), then end them, saying so in the summary.
    command -v nvidia-smi > /dev/null || return 0
    local apps=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        apps=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null)
        [ -z "$apps" ] && return 0
        sleep 1
    done
    log "before $1: the GPU still held by $(echo "$apps" | tr '\n' ';') -- ended"
    echo "$apps" | cut -d, -f1 | xargs -r kill -9 2>/dev/null
    sleep 2
}

bench() {  # part name, time limit, then bench_trl.py's arguments
    # --shared-process: our variants one after another in one process (TRL in its own), which spares each the
    # 10-15 s of a process start; a variant the shared process did not finish runs alone after it.
    # --check-pairs 4: the float32 loss-and-gradient check on the first 4 pairs in every part. Over 16 pairs TRL's
    # float32 backward alone asked for more than the H200's 140 GB (2026-12-04: the layers and ckpt parts, which
    # lacked it, stopped in their check with exit 1); 4 pairs check the same computation.
    # LIMIT_<part>=<s> on the command line overrides a part's limit (to fit the device time left)
    local name=$1 limit_var="LIMIT_$1"; local limit=${!limit_var:-$2}; shift 2
    gpu_idle "$name"
    timeout -k 10 "$limit" python3 benchmarks/bench_trl.py --preset gpu --shared-process --check-pairs 4 "$@" \
        --json "$WORK/bench-$name.json" --markdown "$WORK/bench-$name.md" > "$WORK/bench-$name.log" 2>&1
    log "$name: exit $?"; cat "$WORK/bench-$name.md" >> "$WORK/summary.md" 2>/dev/null
    publish
}
if want b16; then  # the realistic batch of the speed and MFU targets
    # A process start cost about 10-15 s on the H200, and FlexAttention or Liger 5-15 s of kernel builds (2026-11-30:
    # 165 s held the loss check and 4.5 runs at batch 4, a process each); torch.compile's warm-up is not measured
    # yet, guessed at a minute (the loss check runs the +compile variants eagerly). So each part lists its runs
    # most-needed first, and a part cut off keeps the runs it finished.
    # Packed rows with the Liger head (fused in every layout since 2026-11-30): packed-flex's speed with the
    # Liger head's memory. Then the MFU candidates: without gradient checkpointing (the recomputed forward is
    # about a quarter of the step's work, uncounted by MFU; the H200 holds batch 16 without it), compiled and
    # not, set beside TRL without checkpointing too (--trl-nockpt). The padded Liger run's 0.45x TRL's memory was
    # measured on 2026-11-30; packed-flex+liger takes its place here.
    # Liger's kernels in the decoder layers (hardware.fused_layers=liger: RMSNorm, SwiGLU, rotary embedding in one
    # kernel each instead of chains of memory-bound passes) are the other way to fuse them, without a compile.
    # The compiled run goes last (its compile alone may take a minute or more: the compiled-layers test was still
    # compiling at 190 s on 2026-11-30), and the loss check runs it eagerly (--eager-check), so that no compile
    # comes before the first timed run.
    # Liger's layer kernels (+liger-layers) left out of the default part since 2026-12-02: 210 s did not hold it beside
    # the compiled run (PARTS=layers runs it alone).
    # The check (loss and, since 2026-12-02, each weight's gradient against TRL's, in float32) takes the first 4
    # pairs: the same computation at a quarter of a float32 backward over 16 pairs.
    log "benchmark, batch 16"
    # 2026-12-04: 172 s ran the check, TRL (74 s with its process start), TRL+nockpt (out of memory) and our two
    # eager runs; the compiled run was not reached, so it has a part of its own since (compile16).
    bench b16 180 --batch 16 --steps 5 --trl-nockpt --variants packed-flex+liger,packed-flex+nockpt
fi
if want big; then
    # A batch TRL cannot fit on the H200: between batch 4 and 16 (2026-11-30) TRL's peak grew 2,926 MiB per
    # pair, so at 64 pairs it would need about 200,000 MiB of the 143,771 (at 48, about 155,000: too close to
    # call once both sides step fused AdamW); ours grew about 313 MiB per pair (padded, Liger head).
    # The loss check uses the first 4 pairs (TRL's float32 check of 64 would not fit either).
    # One variant of ours (75 s did not reach the first of two: the check, TRL's failed start and our process start
    # with its FlexAttention build come first).
    log "benchmark, batch 64 (TRL should run out of memory)"
    bench big 120 --batch 64 --warmup 1 --steps 2 --variants packed-flex+liger
fi
# Where the time goes, the question the MFU target (35%; 13% measured) turns on: TRL, the padded path and the
# batch-16 candidate (packed FlexAttention rows, Liger head) at batch 16, 2 steps each under torch.profiler: GPU
# busy share, kernels, synchronisations, the slowest kernels. Before b4 since 2026-12-01: it never had time left.
if want profile; then  # only when named since 2026-12-02 (the default parts fill the time); TRL is profiled apart
    log "profile, batch 16"
    # 2026-12-04 profiled packed-flex+liger and plain (RESULTS.md); since, the MFU candidate without checkpointing
    bench profile 100 --batch 16 --profile --warmup 2 --steps 2 --no-trl --variants packed-flex+nockpt,plain
fi
if want layers; then  # only when named: Liger's kernels in the decoder layers, without checkpointing, at batch 16
    log "benchmark, batch 16: Liger's layer kernels"
    bench layers 120 --batch 16 --steps 5 --no-trl --variants packed-flex+liger-layers+nockpt
fi
# Batch 4 again, now that both sides step fused AdamW (2026-11-30's figures, 1.77x and 1.07x TRL step by step:
# foreach), with the time left of the 460 s (so the check stays under 8 minutes), unless PARTS names it. 20 steps
# after 4 warm-up steps (2026-11-30's 8 after 3 could not rank packed-flex and prefix-flex; TRL had not settled).
left=$(( 460 - $(date +%s) + started ))
if want b4; then  # 2026-12-04: 100 s held the check (about 20 s) and TRL's run (72 s), and none of ours
    b4_limit=180
elif [ "$PARTS" = "$DEFAULT_PARTS" ]; then
    # under 150 s it would hold the check and TRL's run (about 92 s) and none of ours: device time for nothing
    if [ "$left" -ge 150 ]; then b4_limit=$left; else log "batch 4 skipped: $left s left (PARTS=b4 runs it alone)"; fi
fi
if [ -n "${b4_limit:-}" ]; then
    log "benchmark, batch 4: packed-flex and padded ($b4_limit s)"
    bench b4 "$b4_limit" --warmup 4 --steps 20 --variants packed-flex,prefix-flex,plain
fi
if want compile4; then  # only when named: batch 4 with the layers compiled (for a second device run)
    log "benchmark, batch 4 under torch.compile"
    bench compile4 150 --steps 8 --eager-check --variants packed-flex+compile,plain+compile
fi
if want trlaccum; then  # only when named: TRL without checkpointing at batch 16 in 2 micro-batches of 8
    # 2026-12-04: TRL without checkpointing did not fit 16 pairs in one micro-batch on the H200, and the "fits" row
    # set our +nockpt run against the checkpointed TRL; TRL in two micro-batches (the same pairs and gradient a
    # step) may fit and be faster: like with like, both without checkpointing (about 20 + 75 + 45 s)
    # Micro-batches of 8 want about 80 GiB by the 2026-12-04 figures (TRL without checkpointing asked 142.6 GiB for
    # 16 pairs, of which about 18.5 GiB weights, gradients and AdamW moments): they fit the H200, not the H100's 79.6
    # GiB, so on a card under 100 GiB TRL takes 4 micro-batches of 4 (about 50 GiB). TRL_ACCUM=<n> sets it.
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
    accum=${TRL_ACCUM:-$([ "${mib:-0}" -ge 102400 ] && echo 2 || echo 4)}
    log "benchmark, batch 16: TRL without checkpointing in $accum micro-batches, and ours without checkpointing"
    bench trlaccum 200 --batch 16 --steps 5 --no-trl --trl-nockpt --trl-accum "$accum" --variants packed-flex+nockpt
fi
if want compile16; then  # only when named: b16's MFU candidate with its layers compiled, without TRL (b16 timed it)
    # Cut from b16 on 2026-12-04, where it was not reached: its compile's length is still unmeasured.
    log "benchmark, batch 16 under torch.compile, without checkpointing"
    bench compile16 150 --batch 16 --steps 5 --no-trl --eager-check --variants packed-flex+compile+nockpt
fi
if want ckpt; then  # only when named: partial and offloaded checkpointing at batch 16 (hardware.checkpoint_*)
    # Between b16's packed-flex+liger (every layer recomputed) and its +nockpt runs: every 2nd / 4th layer
    # checkpointed, and every layer with its inputs in host memory.
    log "benchmark, batch 16: partial and offloaded checkpointing"
    bench ckpt 150 --batch 16 --steps 5 --variants packed-flex+liger+ckpt2,packed-flex+liger+ckpt4,packed-flex+liger+offload
fi
if want blockmask; then  # only when named: the block mask's build time and memory, ours against torch's
    log "FlexAttention block mask, ours against create_block_mask"
    timeout 90 python3 benchmarks/bench_blockmask.py --device cuda --tokens 8192,16384,32768,65536 \
        --json "$WORK/blockmask.json" > "$WORK/blockmask.log" 2>&1
    log "blockmask: exit $?"; { echo '```'; cat "$WORK/blockmask.log"; echo '```'; } >> "$WORK/summary.md"
    publish
fi
if want flex; then  # only when named: FlexAttention alone at batch 16 under other kernel options (bench_flex.py)
    # 2026-12-04's profile: its forward kernel 2.3 ms a call, its backward 1.8 ms. Seven configs, each its own compile.
    log "FlexAttention alone, batch-16 packed row, kernel options"
    gpu_idle flex
    timeout -k 10 150 python3 benchmarks/bench_flex.py --device cuda --json "$WORK/flex.json" > "$WORK/flex.log" 2>&1
    log "flex: exit $?"; { echo '```'; cat "$WORK/flex.log" | grep -v Warning; echo '```'; } >> "$WORK/summary.md"
    publish
fi
log "issue 17's targets against these figures (benchmarks/targets.py)"
python3 benchmarks/targets.py "$WORK"/bench-{b4,b16,big,compile4,compile16,layers,ckpt}.json \
    --markdown "$WORK/targets.md" > /dev/null 2>&1; cat "$WORK/targets.md" >> "$WORK/summary.md" 2>/dev/null
publish

log "done"
