#!/usr/bin/env bash
# The GPU check, in two halves, because the lent GPU machine has no Rust toolchain and no network:
#
#   experiments/bench/gpu.sh build   # here: release binaries with wgpu into .gpu/ (git-ignored)
#   experiments/bench/gpu.sh run     # there (device tool, carry .gpu and .gl): parity + benchmark
#
# `run` names the GPU, runs the backend parity suite on wgpu (every model against ndarray:
# outputs, states, gradients, training losses, checkpoints across backends), then
# `estafet bench --backend wgpu` at T = 256, T = 4096 and the research shape (d 64, 2 residual
# layers, T 256), writing everything under $OUT.
# .gl holds Debian's Vulkan/GL loaders (libvulkan1 ...), which that image lacks; see
# /work/.library/device/README.md for how they were fetched.
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=.gpu

case "${1:-}" in
build)
  set -e
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/estafet/target}
  cargo build --release --locked --features flex,wgpu
  test_bin=$(cargo test --release --locked --features flex,wgpu --test backend_parity --no-run \
    --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "backend_parity" and m.get("executable"):
        print(m["executable"])')
  mkdir -p "$bin"
  cp "$CARGO_TARGET_DIR/release/estafet" "$bin/estafet"
  cp "$test_bin" "$bin/backend_parity"
  strip "$bin/estafet" "$bin/backend_parity"
  # The device tool carries at most 64 MiB: ship them compressed.
  xz -T2 -6 -f "$bin/estafet" "$bin/backend_parity"
  du -sh "$bin"
  ;;
run)
  out=${OUT:-/tmp/estafet-gpu}
  mkdir -p "$out"
  run_bin=/tmp/estafet-bin
  mkdir -p "$run_bin"
  for f in estafet backend_parity; do xz -dc "$bin/$f.xz" > "$run_bin/$f"; chmod +x "$run_bin/$f"; done
  bin=$run_bin
  if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$icd" ] && export VK_DRIVER_FILES=$icd
  export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/xdg}; mkdir -p "$XDG_RUNTIME_DIR"; chmod 700 "$XDG_RUNTIME_DIR"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  "$bin/estafet" list backends | tee -a "$out/gpu.txt"
  echo "== parity (wgpu vs ndarray)"
  ESTAFET_PARITY_BACKEND=wgpu timeout "${PARITY_SECONDS:-150}" "$bin/backend_parity" --test-threads 1 --nocapture \
    > "$out/parity.log" 2>&1
  echo "parity exit $?" | tee -a "$out/parity.log"
  grep -E "agree|match|test result|panicked|Δ" "$out/parity.log" | tail -25
  # T 256: the reference's shape. T 4096: one timed call per phase, since every time step is a
  # few kernel launches and the lease is short; each model's line is written as it finishes.
  # research: the issue-17 research shape (d 64, 2 pre-norm residual layers, T 256, B 32).
  for run in T256 T4096 research; do
    case $run in
    T256) args=(--seq-len 256 --batch 32 --warmup 1 --steps 5 --max-seconds 4) ;;
    T4096) args=(--seq-len 4096 --batch "${BATCH_4096:-8}" --warmup 1 --steps 1 --max-seconds 1) ;;
    research) args=(--seq-len 256 --batch 32 --d-model 64 --layers 2 --layout residual --warmup 1 --steps 5
      --max-seconds 4) ;;
    esac
    echo "== bench wgpu, $run: ${args[*]}"
    timeout "${BENCH_SECONDS:-180}" "$bin/estafet" bench --backend wgpu "${args[@]}" \
      --json > "$out/bench-wgpu-$run.jsonl"
    echo "bench exit $?"
    cut -c1-160 "$out/bench-wgpu-$run.jsonl"
  done
  ;;
*)
  echo "usage: experiments/bench/gpu.sh build|run" >&2
  exit 2
  ;;
esac
