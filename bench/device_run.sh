#!/usr/bin/env bash
# Real-size `sfllava bench` runs on MLX's CUDA backend, for the lent GPU machine
# (docs/performance.md, "On an NVIDIA H100"). Random weights, the real shapes, 128 frames.
#
# On the device (run from the repository root; $OUT is the folder that comes back):
#   bash bench/device_run.sh
# It unpacks MLX + mlx-cuda-13 + mlx-lm + PyAV from .whl/ (see "Wheels" below) into
# /tmp/site, links the image's own CUDA 13 libraries (torch's nvidia-* packages) beside
# them, checks MLX sees the GPU, then runs the profiles, each bounded by `timeout`, the
# whole script by DEVICE_BUDGET_S. It writes at most 5 files under $OUT (the device tool
# returns 8): env.txt, smoke.txt, bench.log (every run's stderr), results.jsonl (one line a
# run: name, arguments, exit code, wall, the bench's JSON report) and summary.txt.
#
# Wheels (built on the development machine, Python 3.12 x86_64 manylinux; .whl/ is ignored):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_35_x86_64 \
#       --implementation cp --abi cp312 --no-deps mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2
#   pip download ... --platform manylinux_2_28_x86_64 --no-deps av==18.1.0
#   unzip every wheel into one folder (that is what pip --target would install), then
#   `tar -cf - . | xz -6 -T2 > site.tar.xz`: 102 MB (the zipped wheels: 127 MB; libmlx.so,
#   145 MB, barely compresses), over one call's 64 MiB, so `split -n 2 -d -a 1` into
#   .whl/p1/site.tar.xz.part0 and .whl/p2/site.tar.xz.part1 (49 MiB each).
#   The script takes .whl/site.tar.xz, or parts (joined in name order) from /tmp/whlparts/
#   (left by the call before) and .whl/, else .whl/*.whl through pip.
#
# Device calls made (2026-11-27, H100): call 1 carried .whl/p1 and copied its part to
# /tmp/whlparts/; call 2, at once (a warm machine keeps /tmp 30 s), carried .whl/p2 and ran
#   SITE_SHA256=<sha256 of the whole archive> bash bench/device_run.sh
# A later call on the same warm machine can skip the install:
#   PYTHONPATH=/tmp/site DEVICE_SKIP_INSTALL=1 DEVICE_ONLY=fp16 bash bench/device_run.sh
#
# Test the logic on a CPU with tiny settings (no install, the repo's .venv; DEVICE_ONLY picks
# runs by a regex of their names, DEVICE_STEP_SCALE multiplies each run's time limit):
#   DEVICE_SMALL=1 DEVICE_SKIP_INSTALL=1 DEVICE_BUDGET_S=3000 DEVICE_STEP_SCALE=10 \
#     DEVICE_ONLY='sf15b-bf16-q4|ov7b' PYTHON=.venv/bin/python OUT=/tmp/devout bash bench/device_run.sh
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${DEVICE_SITE:-/tmp/site}
BUDGET=${DEVICE_BUDGET_S:-330}
SMALL=${DEVICE_SMALL:-0}
START=$(date +%s)
RESULTS=$OUT/results.jsonl
BLOG=$OUT/bench.log
: > "$RESULTS"
: > "$BLOG"

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(elapsed)s] $*"; }

# ------------------------------------------------------------------ environment
{
  echo "date: $(date -u)"
  uname -a
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true
  nvidia-smi 2>&1 | head -20 || true
  $PY -V 2>&1
  command -v nvcc && nvcc --version | tail -2
  nproc
  free -g 2>/dev/null | head -2
} > "$OUT/env.txt" 2>&1
say "env written"

# ------------------------------------------------------------------ install
if [ "${DEVICE_SKIP_INSTALL:-0}" != 1 ]; then
  mkdir -p "$SITE"
  # parts (site.tar.xz.part0, part1...) carried in this call or left in /tmp/whlparts/ by
  # the call before it, joined in suffix order, each name once: a warm machine's repository
  # copy keeps paths carried by an earlier call (.whl/p1 was still there in the second call)
  parts=$(for p in /tmp/whlparts/site.tar.xz.part* .whl/site.tar.xz.part* .whl/*/site.tar.xz.part*; do
            [ -f "$p" ] && echo "$(basename "$p") $p"; done | sort -u -k1,1 | awk '{print $2}')
  unxz() {  # xz files on stdin -> unpacked into $SITE
    if command -v xz >/dev/null; then xz -dc | tar -C "$SITE" -xf -
    else $PY -c 'import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1])' "$SITE"
    fi
  }
  if [ -f .whl/site.tar.xz ]; then
    say "unpacking .whl/site.tar.xz"
    unxz < .whl/site.tar.xz || { say "unpack failed"; exit 3; }
  elif [ -n "$parts" ]; then
    say "joining parts: $(echo $parts | tr '\n' ' ')"
    sum=$(cat $parts | sha256sum | cut -c1-64)
    echo "joined sha256 $sum (expected ${SITE_SHA256:-unset})" >> "$OUT/env.txt"
    if [ -n "${SITE_SHA256:-}" ] && [ "$sum" != "$SITE_SHA256" ]; then
      say "joined archive sha256 $sum != $SITE_SHA256: stopping"; exit 3; fi
    cat $parts | unxz || { say "unpack failed"; exit 3; }
  else
    say "pip-installing .whl/*.whl"
    $PY -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || exit 3
  fi
  # libmlx.so's RPATH is $ORIGIN/../../nvidia/{cu13,cublas,cudnn,...}/lib: point SITE/nvidia
  # at the image's own nvidia-* packages (PyTorch's CUDA 13 libraries).
  NV=$($PY -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)
  if [ -n "$NV" ] && [ -d "$NV" ] && [ ! -e "$SITE/nvidia" ]; then ln -s "$NV" "$SITE/nvidia"; fi
  echo "nvidia libs: $(ls "$SITE/nvidia/" 2>&1 | tr '\n' ' ')" >> "$OUT/env.txt"
  export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
# MLX's JIT (NVRTC) needs the CUDA headers: CUDA_HOME, else it tries /usr/local/cuda.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /x/x/x)")")")" \
           /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13; do
    if [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_HOME=$d; break; fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-} PYTHONPATH=$PYTHONPATH" >> "$OUT/env.txt"
say "installed ($(du -sh "$SITE" 2>/dev/null | cut -f1))"

# ------------------------------------------------------------------ smoke test + yardsticks
timeout -k 5 120 $PY - > "$OUT/smoke.txt" 2>&1 <<'EOF'
import time
import mlx.core as mx
print("mlx", getattr(mx, "__version__", "?"), mx.__file__, "default device", mx.default_device())
print("cuda available", mx.cuda.is_available() if hasattr(mx, "cuda") else "no mx.cuda")
try:
    print("device_info", mx.device_info())
except Exception as e:  # noqa: BLE001
    print("device_info failed:", e)
gpu = mx.default_device() != mx.cpu
n = 8192 if gpu else 512
for dt in (mx.bfloat16, mx.float16):
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b)
    for _ in range(3):
        mx.eval(a @ b)
    best = 1e9
    for _ in range(10):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    print(f"matmul {n}^3 {dt}: {2 * n**3 / best / 1e12:.1f} TFLOP/s (best of 10)")
m = (1 << 30) if gpu else (1 << 24)
x = mx.ones((m,), dtype=mx.float32)
mx.eval(x)
best = 1e9
for _ in range(10):
    t = time.perf_counter()
    y = x + 1.0
    mx.eval(y)
    best = min(best, time.perf_counter() - t)
    del y
print(f"x + 1 over {4 * m / 1e9:.1f} GB float32: {8 * m / best / 1e9:.0f} GB/s read+write (best of 10)")
print("peak memory", mx.get_peak_memory() / 1e9, "GB")
EOF
rc=$?
say "smoke rc=$rc"; cat "$OUT/smoke.txt"
if [ $rc != 0 ]; then say "MLX does not run here: stopping"; exit 4; fi

# ------------------------------------------------------------------ the profiles
if [ "$SMALL" = 1 ]; then
  # float32: MLX's CPU backend has no fast half-precision path
  FRAMES=1; COMMON=(--runs 1 --warmup 0 --max-tokens 2 --no-reopen)
  S15=1.5b; S7=1.5b; BF=float32; FP=float32
else
  FRAMES=128; COMMON=(--runs 2 --warmup 1 --max-tokens 64)
  S15=1.5b; S7=7b; BF=bfloat16; FP=float16
fi
# H100 SXM5 80 GB specification: dense bf16/fp16 989 TFLOPS, HBM3 3.35 TB/s (the shares).
PEAK=(--peak-tflops 989 --peak-bandwidth-gbs 3350)

bench() {  # name step_timeout_s bench-arguments...
  local name=$1 limit=$(( $2 * ${DEVICE_STEP_SCALE:-1} )); shift 2
  if [ -n "${DEVICE_ONLY:-}" ] && ! [[ $name =~ $DEVICE_ONLY ]]; then return; fi
  local left=$(( BUDGET - $(elapsed) - 10 ))
  if [ $left -lt 40 ]; then
    say "SKIP $name: ${left}s of the budget left"
    echo "{\"name\": \"$name\", \"skipped\": true}" >> "$RESULTS"
    return
  fi
  [ $limit -gt $left ] && limit=$left
  say "RUN $name (limit ${limit}s): bench $*"
  echo "===== $name: bench $*" >> "$BLOG"
  local t0=$(date +%s)
  timeout -k 5 "$limit" $PY -c 'import sys; from sfllava_app.cli import entry; entry()' bench "$@" \
    > "$OUT/.cur.json" 2>> "$BLOG"
  local rc=$? wall=$(( $(date +%s) - t0 ))
  say "  $name rc=$rc wall=${wall}s"
  $PY - "$name" "$rc" "$wall" "$OUT/.cur.json" "$*" >> "$RESULTS" <<'EOF'
import json, sys
name, rc, wall, path, argv = sys.argv[1:]
try:
    report = json.load(open(path))
except Exception as e:  # noqa: BLE001
    report = {"error": f"no JSON: {e}"}
print(json.dumps({"name": name, "rc": int(rc), "wall_s": int(wall), "args": argv,
                  "report": report}))
EOF
  rm -f "$OUT/.cur.json"
}

HAS_OV=0
if $PY -c 'import sys; from sfllava_app.bench.random_weights import SIZES; sys.exit("ov-7b" not in SIZES)' \
   && grep -rq -- '--recipe' app/bench/; then HAS_OV=1; fi
say "ov-7b in bench: $HAS_OV"

# One process per configuration (the bench prints its JSON only at the end, so a run cut by
# its timeout loses only itself), the most wanted first.
SF=(--frames $FRAMES "${COMMON[@]}" "${PEAK[@]}" --json)
# (a script test only: a converted tiny model directory, seconds on a CPU)
[ -n "${DEVICE_TINY_MODEL:-}" ] && bench tiny 60 --model "$DEVICE_TINY_MODEL" "${COMMON[@]}" --json
bench sf15b-bf16-q4 150 --random-weights $S15 --dtype $BF --q-bits 4 "${SF[@]}"
bench sf15b-bf16 90 --random-weights $S15 --dtype $BF --q-bits none "${SF[@]}"
bench sf7b-bf16-q4 110 --random-weights $S7 --dtype $BF --q-bits 4 "${SF[@]}"
if [ $HAS_OV = 1 ]; then
  if [ "$SMALL" = 1 ]; then OV=(ov-0.5b --frames 2); else OV=(ov-7b); fi
  bench ov7b-bf16-q4 130 --random-weights "${OV[@]}" --recipe native,slowfast --dtype $BF \
    --q-bits 4 "${COMMON[@]}" "${PEAK[@]}" --json
fi
bench sf15b-fp16-q4 90 --random-weights $S15 --dtype $FP --q-bits 4 "${SF[@]}"
bench sf15b-fp16 90 --random-weights $S15 --dtype $FP --q-bits none "${SF[@]}"

# ------------------------------------------------------------------ summary (last in the output)
$PY -m bench.device_summary "$RESULTS" | tee "$OUT/summary.txt"
say "done"
