#!/usr/bin/env bash
# The GPU check, in two halves, because the lent GPU machine has no Rust toolchain and no network:
#
#   experiments/bench/gpu.sh build   # here: release binaries with wgpu into .gpu/ (git-ignored)
#   experiments/bench/gpu.sh run     # there (device tool, carry .gpu and .gl): the whole check
#
# `run`, in one call of at most 8 minutes, on one GPU: names the GPU; runs the GPU kernels'
# tests (every kernel against its definition, gradients included, and the launches of a training
# step at T 16 and T 128) and the backend parity suite on wgpu; then `estafet bench --backend
# wgpu` at the research shapes (d 64 and 128, 2 residual layers, B 32, T 256 and 1024, with
# launches per step) and at T 4096, B 8; and, on the same GPU in the same call, PyTorch at the
# same shapes (`torch_baseline.py --device cuda`: cuDNN's RNN/LSTM/GRU, SDPA, the reference Mamba
# and minGRU). Everything lands under $OUT. Locally (no GPU) `run` works on lavapipe with small
# budgets, for testing the script: `SMOKE=1 experiments/bench/gpu.sh run`.
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
  tests=$(cargo test --release --locked --features flex,wgpu --test backend_parity --test gpu_kernels \
    --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] in ("backend_parity", "gpu_kernels") and m.get("executable"):
        print(m["target"]["name"], m["executable"])')
  mkdir -p "$bin"
  cp "$CARGO_TARGET_DIR/release/estafet" "$bin/estafet"
  while read -r name path; do cp "$path" "$bin/$name"; done <<<"$tests"
  cp ../shared/bench/torch_baseline.py "$bin/torch_baseline.py"
  strip "$bin/estafet" "$bin/backend_parity" "$bin/gpu_kernels"
  # The device tool carries at most 64 MiB: ship them compressed.
  xz -T2 -6 -f "$bin/estafet" "$bin/backend_parity" "$bin/gpu_kernels"
  du -sh "$bin"
  ;;
run)
  out=${OUT:-/tmp/estafet-gpu}
  mkdir -p "$out"
  run_bin=/tmp/estafet-bin
  mkdir -p "$run_bin"
  for f in estafet backend_parity gpu_kernels; do
    xz -dc "$bin/$f.xz" > "$run_bin/$f" && chmod +x "$run_bin/$f"
  done
  if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$icd" ] && export VK_DRIVER_FILES=$icd
  export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/xdg}; mkdir -p "$XDG_RUNTIME_DIR"; chmod 700 "$XDG_RUNTIME_DIR"
  models=rnn,lstm,gru,mingru,minlstm,mamba,mamba2,rwkv,rwkv7,gated_deltanet,mlstm,slstm,attention
  torch_models=rnn,lstm,gru,mamba_seq,mingru,attention
  if [ -n "${SMOKE:-}" ]; then
    export CUBECL_WGPU_DEFAULT_DEVICE=Cpu
    shapes=("64 64 8") long=(64 64 4 lstm) steps=(--warmup 1 --steps 1 --max-seconds 1)
  else
    shapes=("64 256 32" "64 1024 32" "128 256 32" "128 1024 32") long=(64 4096 8 lstm)
    steps=(--warmup 2 --steps 5 --max-seconds 4)
  fi
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
      || echo "no NVIDIA GPU"; "$run_bin/estafet" list backends; } | tee "$out/gpu.txt"

  echo "== GPU kernels against their definitions; launches per step"
  ESTAFET_PARITY_BACKEND=wgpu timeout "${KERNEL_SECONDS:-60}" "$run_bin/gpu_kernels" --test-threads 1 \
    --nocapture > "$out/kernels.log" 2>&1
  echo "kernels exit $?" | tee -a "$out/kernels.log"
  grep -E "launches per|test result|panicked" "$out/kernels.log" | tail -20

  echo "== parity (wgpu vs ndarray)"
  ESTAFET_PARITY_BACKEND=wgpu timeout "${PARITY_SECONDS:-90}" "$run_bin/backend_parity" \
    --test-threads 1 --nocapture > "$out/parity.log" 2>&1
  echo "parity exit $?" | tee -a "$out/parity.log"
  grep -E "test result|panicked" "$out/parity.log" | tail -5

  for shape in "${shapes[@]}"; do
    read -r d t b <<<"$shape"
    echo "== bench wgpu: d $d, 2 residual layers, T $t, B $b"
    timeout "${BENCH_SECONDS:-50}" "$run_bin/estafet" bench --backend wgpu --models "$models" \
      --d-model "$d" --seq-len "$t" --batch "$b" --layers 2 --layout residual --no-step \
      "${steps[@]}" --json > "$out/bench-wgpu-d$d-T$t.jsonl"
    echo "bench exit $?"
    cut -c1-200 "$out/bench-wgpu-d$d-T$t.jsonl"
    if [ -z "${SMOKE:-}" ]; then
      echo "== PyTorch on the GPU: the same shape"
      timeout "${TORCH_SECONDS:-30}" python3 "$bin/torch_baseline.py" --device cuda --models "$torch_models" \
        --d-model "$d" --seq-len "$t" --batch "$b" --layers 2 --layout residual --warmup 2 --steps 5 \
        --max-seconds 4 --json > "$out/torch-cuda-d$d-T$t.jsonl" 2> "$out/torch-cuda-d$d-T$t.err"
      echo "torch exit $?"
      cut -c1-200 "$out/torch-cuda-d$d-T$t.jsonl"
    fi
  done
  read -r d t b m <<<"${long[*]}"
  echo "== bench wgpu: $m, d $d, 2 residual layers, T $t, B $b"
  timeout "${BENCH_SECONDS:-60}" "$run_bin/estafet" bench --backend wgpu --models "$m" --d-model "$d" \
    --seq-len "$t" --batch "$b" --layers 2 --layout residual --no-step --warmup 1 --steps 3 \
    --max-seconds 4 --json > "$out/bench-wgpu-long.jsonl"
  echo "bench exit $?"
  cut -c1-200 "$out/bench-wgpu-long.jsonl"
  ;;
*)
  echo "usage: experiments/bench/gpu.sh build|run" >&2
  exit 2
  ;;
esac
