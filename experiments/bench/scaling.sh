#!/usr/bin/env bash
# Two threads against one (or N against one) on the research shapes: `estafet bench` training
# tokens/s at 1 and N threads, in interleaved rounds (1, N, 1, N, ...) so that the shared host's
# slow spells fall on both, and the 1024³ GEMM yardstick beside each run. Per shape it prints the
# median training rate of each thread count over the rounds, their ratio, the ratio of the best
# rounds, and how much the yardstick itself scaled (the machine's own limit for dense work).
#
#   experiments/bench/scaling.sh                        # d 64, 128 × T 256, 1024, 7 models, 3 rounds
#   experiments/bench/scaling.sh --rounds 5 --models lstm,gru --d-models 64 --seq-lens 256
#
# Each run makes 3 untimed training steps before its 8 timed ones: a run's second and third steps
# still fault in memory on the threads that did not allocate it in the first (RWKV-4 at d 64 on two
# threads: 98k tokens/s with one untimed step, 122k with four), which reads as poor scaling.
#
# Environment: CARGO_TARGET_DIR (shared with CI), ESTAFET_FEATURES (cargo features of the build,
# default flex; flex,wgpu reuses the build of compare.sh, gpu.sh and CI), OUT (a directory for the
# raw JSON lines).
set -euo pipefail
cd "$(dirname "$0")/../.."

rounds=3 threads=2 models=rnn,lstm,gru,mamba,rwkv,mingru,attention d_models="64 128" seq_lens="256 1024"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --d-models) d_models=${2//,/ }; shift 2 ;;
    --seq-lens) seq_lens=${2//,/ }; shift 2 ;;
    *) echo "scaling.sh: unknown argument $1 (known: --rounds --threads --models --d-models --seq-lens)" >&2; exit 2 ;;
  esac
done
{ [ "$rounds" -ge 1 ] && [ "$threads" -ge 2 ]; } 2>/dev/null ||
  { echo "scaling.sh: need --rounds ≥ 1 and --threads ≥ 2" >&2; exit 2; }

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/estafet/target}
features=${ESTAFET_FEATURES:-flex}
echo "== building estafet (release, features $features)" >&2
cargo build --release --locked --features "$features" --quiet
estafet=$CARGO_TARGET_DIR/release/estafet
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
echo "== $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) CPUs, $(date -u '+%Y-%m-%d %H:%M UTC'), raw lines in $out" >&2

for d in $d_models; do
  for t in $seq_lens; do
    for m in ${models//,/ }; do
      : > "$out/scaling-$m-d$d-T$t-1.jsonl"
      : > "$out/scaling-$m-d$d-T$t-$threads.jsonl"
      for r in $(seq "$rounds"); do
        for n in 1 "$threads"; do
          "$estafet" bench --json --no-step --warmup 3 --steps 8 --models "$m" --d-model "$d" \
            --seq-len "$t" --threads "$n" --layers 2 --layout residual --backend flex |
            tail -n 1 >> "$out/scaling-$m-d$d-T$t-$n.jsonl"
        done
      done
      python3 - "$out" "$m" "$d" "$t" "$threads" <<'PY'
import json, statistics, sys
out, m, d, t, n = sys.argv[1:]
def runs(k):
    return [json.loads(l) for l in open(f"{out}/scaling-{m}-d{d}-T{t}-{k}.jsonl")]
one, many = runs(1), runs(n)
rate = lambda rs, f: [r[f] for r in rs]
med = lambda rs, f: statistics.median(rate(rs, f))
print(f"{m:9} d {d:>3} T {t:>4}  1 thread {med(one, 'train_tok_s') / 1e3:7.1f}k  "
      f"{n} threads {med(many, 'train_tok_s') / 1e3:7.1f}k  "
      f"ratio {med(many, 'train_tok_s') / med(one, 'train_tok_s'):.2f} "
      f"(best rounds {max(rate(many, 'train_tok_s')) / max(rate(one, 'train_tok_s')):.2f})  "
      f"gemm {med(many, 'gemm_gflops') / med(one, 'gemm_gflops'):.2f}", flush=True)
PY
    done
  done
done
