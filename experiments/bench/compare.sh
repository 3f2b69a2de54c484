#!/usr/bin/env bash
# estafet beside PyTorch, in one go, at one thread count: runs ../shared/bench/torch_baseline.py
# (installing torch into a virtual environment if it is missing) and `estafet bench` on ndarray
# and flex, then prints the ratio estafet / PyTorch per model and figure (higher is better for
# tokens/s, lower for memory).
#
#   experiments/bench/compare.sh                          # B 32, T 256, 2 threads
#   experiments/bench/compare.sh --batch 8 --seq-len 4096 # the scaling points
#
# Environment: TORCH_BASELINE (the reference script), ESTAFET_VENV (where torch lives),
# CARGO_TARGET_DIR (shared with CI), OUT (a directory for the raw JSON lines), ESTAFET_FEATURES
# (cargo features of the build, default flex; flex,wgpu reuses the build of gpu.sh and CI).
set -euo pipefail
cd "$(dirname "$0")/../.."

batch=32 seq_len=256 threads=2 backends="ndarray flex"
while [ $# -gt 0 ]; do
  case "$1" in
    --batch) batch=$2; shift 2 ;;
    --seq-len) seq_len=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --backends) backends=$2; shift 2 ;;
    *) echo "compare.sh: unknown argument $1 (known: --batch --seq-len --threads --backends)" >&2; exit 2 ;;
  esac
done

baseline=${TORCH_BASELINE:-../shared/bench/torch_baseline.py}
[ -f "$baseline" ] || { echo "compare.sh: no PyTorch reference at $baseline (set TORCH_BASELINE)" >&2; exit 2; }
venv=${ESTAFET_VENV:-$HOME/.cache/estafet/venv}
if ! "$venv/bin/python" -c "import torch, numpy" 2>/dev/null; then
  echo "== installing torch and numpy into $venv (a few minutes, ~5 GB)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch numpy
fi
if ! "$venv/bin/python" -c "import mambapy" 2>/dev/null; then
  "$venv/bin/pip" install --quiet mambapy || echo "compare.sh: mambapy not installed; its column stays empty" >&2
fi
mambapy=$("$venv/bin/python" -c "import mambapy" 2>/dev/null && echo --include-mambapy || true)

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/estafet/target}
features=${ESTAFET_FEATURES:-flex}
echo "== building estafet (release, features $features)" >&2
cargo build --release --locked --features "$features" --quiet
estafet=$CARGO_TARGET_DIR/release/estafet

out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
common=(--batch "$batch" --seq-len "$seq_len" --threads "$threads")
echo "== PyTorch reference, B $batch, T $seq_len, $threads threads" >&2
"$venv/bin/python" "$baseline" --json --models rnn,lstm,gru,mamba_seq,rwkv $mambapy "${common[@]}" > "$out/torch.jsonl"
for b in $backends; do
  echo "== estafet on $b" >&2
  "$estafet" bench --json --backend "$b" "${common[@]}" > "$out/estafet-$b.jsonl" || true
done

python3 - "$out" $backends <<'PY'
import json, sys, os, platform
out, backends = sys.argv[1], sys.argv[2:]
def load(path):
    rows = {}
    for line in open(path):
        line = line.strip()
        if line:
            r = json.loads(line)
            rows[r["model"]] = r
    return rows
torch = load(os.path.join(out, "torch.jsonl"))
ours = {b: load(os.path.join(out, f"estafet-{b}.jsonl")) for b in backends}
# estafet's model → the reference's; Mamba is also compared with mambapy.
pairs = [("rnn", "rnn"), ("lstm", "lstm"), ("gru", "gru"), ("mamba", "mamba_seq"), ("mamba", "mambapy"), ("rwkv", "rwkv")]
any_row = next(iter(torch.values()))
c = any_row.get("config", {})
print(f"B {c.get('batch')}, T {c.get('seq_len')}, {any_row.get('threads')} threads; torch {any_row.get('torch')}; "
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
print()
head = "| model | vs | " + " | ".join(f"{b} train | {b} infer | {b} RSS" for b in backends) + " | torch train tok/s | torch infer tok/s | torch RSS MB |"
print(head)
print("|" + "---|" * (head.count("|") - 1))
def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "-"
for mine, ref in pairs:
    t = torch.get(ref)
    if not t or "error" in t:
        continue
    cells = []
    for b in backends:
        r = ours[b].get(mine, {})
        if "error" in r or not r:
            cells += ["error", "", ""]
            continue
        cells += [ratio(r["train_tok_s"], t["train_tok_s"]), ratio(r["infer_tok_s"], t["infer_tok_s"]),
                  ratio(r["peak_rss_mb"], t["peak_rss_mb"])]
    print(f"| {mine} | {ref} | " + " | ".join(cells) +
          f" | {t['train_tok_s']:,.0f} | {t['infer_tok_s']:,.0f} | {t['peak_rss_mb']:,.0f} |")
print()
print("estafet absolute figures:")
print("| backend | model | train tok/s | infer tok/s | step tok/s | peak RSS MB | step-phase RSS MB | params | state floats |")
print("|---|---|---|---|---|---|---|---|---|")
for b in backends:
    for m, r in ours[b].items():
        if "error" in r:
            print(f"| {b} | {m} | error: {r['error']} | | | | | | |")
            continue
        step = f"{r['step_tok_s']:,.0f}" if r.get("step_tok_s") else "-"
        print(f"| {b} | {m} | {r['train_tok_s']:,.0f} | {r['infer_tok_s']:,.0f} | {step} | {r['peak_rss_mb']:,.0f} | "
              f"{r['peak_rss_step_mb']:,.0f} | {r['params']:,} | {r['state_floats']:,} |")
PY
echo "raw JSON lines: $out" >&2
