#!/usr/bin/env bash
# estafet beside PyTorch, in one go, at one thread count: runs ../shared/bench/torch_baseline.py
# (installing torch into a virtual environment if it is missing) and `estafet bench` on ndarray
# and flex at every shape, then prints per shape the ratio estafet / PyTorch per model (higher is
# better for tokens/s, lower for memory) and estafet's efficiency: its training FLOP rate over one
# 1024³ f32 GEMM's in the same process on the same threads.
#
#   experiments/bench/compare.sh                          # the reference workload: B 32, T 256, one layer
#   experiments/bench/compare.sh --batch 8 --seq-len 4096 # a scaling point
#   experiments/bench/compare.sh --d-model 64 --layers 2 --layout residual   # one research shape
#   experiments/bench/compare.sh --suite research         # d 32/64/128 × T 256/1024, 2 residual layers
#
# Environment: TORCH_BASELINE (the reference script), ESTAFET_VENV (where torch lives),
# CARGO_TARGET_DIR (shared with CI), OUT (a directory for the raw JSON lines), ESTAFET_FEATURES
# (cargo features of the build, default flex; flex,wgpu reuses the build of gpu.sh and CI),
# MODELS (estafet's models, default all seven).
set -euo pipefail
cd "$(dirname "$0")/../.."

batch=32 seq_len=256 threads=2 backends="ndarray flex" d_model="" layers=1 layout=stacked mlp=0 suite=""
while [ $# -gt 0 ]; do
  case "$1" in
    --batch) batch=$2; shift 2 ;;
    --seq-len) seq_len=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --backends) backends=$2; shift 2 ;;
    --d-model) d_model=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --layout) layout=$2; shift 2 ;;
    --mlp-expand) mlp=$2; shift 2 ;;
    --suite) suite=$2; shift 2 ;;
    *) echo "compare.sh: unknown argument $1 (known: --batch --seq-len --threads --backends --d-model --layers --layout --mlp-expand --suite)" >&2; exit 2 ;;
  esac
done

# Each shape: "batch seq_len d_model layers layout" (d_model "-": each model's reference width).
shapes=()
case "$suite" in
  "") shapes=("$batch $seq_len ${d_model:--} $layers $layout") ;;
  research) for d in 32 64 128; do for t in 256 1024; do shapes+=("32 $t $d 2 residual"); done; done ;;
  *) echo "compare.sh: unknown suite $suite (known: research)" >&2; exit 2 ;;
esac

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

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/estafet/target}
features=${ESTAFET_FEATURES:-flex}
echo "== building estafet (release, features $features)" >&2
cargo build --release --locked --features "$features" --quiet
estafet=$CARGO_TARGET_DIR/release/estafet
models=${MODELS:-rnn,lstm,gru,mamba,rwkv,mingru,attention}
torch_models=$(echo "$models" | sed 's/\bmamba\b/mamba_seq/')
# mambapy is a second Mamba reference, timed only when estafet's Mamba is.
mambapy=""
if [[ ",$models," == *,mamba,* ]] && "$venv/bin/python" -c "import mambapy" 2>/dev/null; then
  mambapy=--include-mambapy
fi

out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
i=0
for shape in "${shapes[@]}"; do
  read -r b t d n lay <<<"$shape"
  common=(--batch "$b" --seq-len "$t" --threads "$threads" --layers "$n" --layout "$lay")
  [ "$d" != "-" ] && common+=(--d-model "$d")
  [ "$lay" = residual ] && common+=(--mlp-expand "$mlp")
  echo "== shape $i: ${common[*]}: PyTorch" >&2
  "$venv/bin/python" "$baseline" --json --models "$torch_models" $mambapy "${common[@]}" > "$out/torch-$i.jsonl"
  for be in $backends; do
    echo "== shape $i: estafet on $be" >&2
    "$estafet" bench --json --no-step --models "$models" --backend "$be" "${common[@]}" > "$out/estafet-$be-$i.jsonl" || true
  done
  i=$((i + 1))
done

python3 - "$out" "$i" $backends <<'PY'
import json, sys, os, platform
out, n, backends = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def load(path):
    rows = {}
    for line in open(path):
        line = line.strip()
        if line:
            r = json.loads(line)
            rows[r["model"]] = r
    return rows
def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "-"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
pairs = [("rnn", "rnn"), ("lstm", "lstm"), ("gru", "gru"), ("mamba", "mamba_seq"), ("mamba", "mambapy"),
         ("rwkv", "rwkv"), ("mingru", "mingru"), ("attention", "attention")]
for s in range(n):
    torch = load(os.path.join(out, f"torch-{s}.jsonl"))
    ours = {b: load(os.path.join(out, f"estafet-{b}-{s}.jsonl")) for b in backends}
    any_ours = next((r for b in backends for r in ours[b].values() if "error" not in r), {})
    c = any_ours.get("config", {})
    t_any = next(iter(torch.values()), {})
    print(f"### B {c.get('batch')}, T {c.get('seq_len')}, d {c.get('d_model')}, {c.get('layers')} {c.get('layout')} layer(s)"
          f"{', MLP ×' + str(c.get('mlp_expand')) if c.get('mlp_expand') else ''}; {any_ours.get('threads')} threads; "
          f"torch {t_any.get('torch')}; {cpu} ({isa}), {os.cpu_count()} cores; one {1024}³ GEMM: "
          + ", ".join(f"{b} {next((r['gemm_gflops'] for r in ours[b].values() if 'error' not in r), 0):.0f} GFLOP/s" for b in backends))
    print()
    head = ("| model | vs | " + " | ".join(f"{b} train | {b} infer | {b} efficiency" for b in backends)
            + " | torch train tok/s | params (estafet / torch) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for mine, ref in pairs:
        t = torch.get(ref)
        if not t or "error" in t:
            continue
        cells, params = [], "-"
        for b in backends:
            r = ours[b].get(mine, {})
            if "error" in r or not r:
                cells += ["error", "", ""]
                continue
            params = f"{r['params']:,} / {t.get('params', 0):,}"
            cells += [ratio(r["train_tok_s"], t["train_tok_s"]), ratio(r["infer_tok_s"], t["infer_tok_s"]),
                      f"{r['efficiency']:.3f}"]
        print(f"| {mine} | {ref} | " + " | ".join(cells) + f" | {t['train_tok_s']:,.0f} | {params} |")
    print()
    for b in backends:
        for m, r in ours[b].items():
            if "error" in r:
                print(f"estafet {b} {m}: error: {r['error']}")
print("raw JSON lines:", out)
PY
