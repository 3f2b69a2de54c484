#!/usr/bin/env python3
"""Where two threads lose against one: `perf` samples of `estafet bench`'s training steps.

For each shape, trains the model (two residual layers, B 32, flex) once on one thread and once on
two under `perf record -a`, keeps the samples of the steady training steps (from a quarter into
the span of samples in burn's autodiff and optimiser code, so past the untimed steps, to its end)
and splits the speed-up into its two factors:

    speed-up = step(1 thread) / step(2 threads) = 2 · (1 − waiting) / (busy₁ · work)

- waiting: the share of the two CPUs' samples not spent on the model's work (idle, rayon looking
  for work, `fused::pool` spinning, other processes) in the two-thread run;
- busy₁: the same share working in the one-thread run (≈ 1);
- work: CPU time per training step on two threads over that on one; above 1 when the same work
  runs slower side by side (memory bandwidth and the shared L3), below 1 when the one-thread run
  met a slow spell of the host.

It then lists what one CPU ran while the other waited (the serial share, by function and by
thread: `main` is the training thread) and the functions whose CPU time per step grew the most.
The identity holds by construction; what it adds is which factor, and which functions, make a
shape miss 2×. Needs `perf` and a release build (`cargo build --release`).

    experiments/bench/two_threads.py                                  # d 64/128 × T 256/1024
    experiments/bench/two_threads.py --models rnn,lstm --d-models 64 --seq-lens 256
"""
import argparse
import bisect
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

# Symbols of a thread that waits rather than works.
WAITING = ('pool::spin', 'clock_gettime', 'Timespec', 'Instant', 'crossbeam', 'find_work',
           'yield_now', '__schedule', 'pv_native_safe_halt', 'finish_task_switch', '_raw_spin',
           'wait_until', 'futex', 'rayon_core::sleep', 'try_to_wake', 'sched_yield',
           'Chain<A,B>')
SAMPLE = re.compile(r'\s*(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+[0-9a-f]+\s*(.*)')


def profile(binary, model, d, t, threads, freq, workdir):
    """Runs the bench under perf; returns its JSON line, the training samples
    (time, pid, tid, cpu, symbol), the model's process id and the window's length in seconds."""
    data = os.path.join(workdir, f'{model}-{d}-{t}-{threads}.data')
    bench = [binary, 'bench', '--json', '--no-step', '--warmup', '3', '--steps', '12',
             '--max-seconds', '600', '--models', model, '--d-model', str(d), '--seq-len', str(t),
             '--threads', str(threads), '--layers', '2', '--layout', 'residual', '--backend', 'flex']
    run = subprocess.run(['perf', 'record', '-q', '-a', '-e', 'cpu-clock', '-F', str(freq),
                          '-o', data, '--'] + bench, capture_output=True, text=True)
    lines = [l for l in run.stdout.splitlines() if l.startswith('{')]
    if run.returncode != 0 or not lines:
        sys.exit(f'two_threads.py: {" ".join(bench)} failed: {run.stderr.strip()[-300:]}')
    script = subprocess.run(['perf', 'script', '-i', data, '-F', 'cpu,pid,tid,time,ip,sym'],
                            capture_output=True, text=True).stdout
    os.remove(data)
    rows = []
    for line in script.splitlines():
        m = SAMPLE.match(line)
        if m:
            rows.append((float(m.group(4)), int(m.group(1)), int(m.group(2)), int(m.group(3)),
                         m.group(5).strip()[:100]))
    ours = collections.Counter(r[1] for r in rows if 'estafet' in r[4] or 'burn' in r[4])
    if not ours:
        sys.exit(f'two_threads.py: no samples with symbols in {binary} (perf script found none)')
    pid = ours.most_common(1)[0][0]
    marks = [r[0] for r in rows if r[1] == pid and ('burn_autodiff' in r[4] or 'burn_optim' in r[4])]
    if len(marks) < 2:
        sys.exit(f'two_threads.py: too few training samples for {model} d {d} T {t}; raise --freq')
    lo, hi = marks[0] + 0.25 * (marks[-1] - marks[0]), marks[-1]
    return json.loads(lines[-1]), [r for r in rows if lo <= r[0] <= hi], pid, hi - lo


def waiting(row, pid):
    return row[1] != pid or any(k in row[4] for k in WAITING)


def decompose(binary, model, d, t, freq, workdir):
    one, rows1, pid1, span1 = profile(binary, model, d, t, 1, freq, workdir)
    two, rows2, pid2, span2 = profile(binary, model, d, t, 2, freq, workdir)
    step1, step2 = one['train_step_ms_median'], two['train_step_ms_median']
    work1 = [r for r in rows1 if not waiting(r, pid1)]
    work2 = [r for r in rows2 if not waiting(r, pid2)]
    busy1 = len(work1) / (span1 * freq)
    busy2 = len(work2) / (2 * span2 * freq)
    work = (2 * busy2 * step2) / (busy1 * step1)
    # What one CPU ran while the other's nearest sample (within two sampling periods) waited.
    per_cpu = {c: [r for r in rows2 if r[3] == c] for c in (0, 1)}
    times = {c: [r[0] for r in per_cpu[c]] for c in per_cpu}
    window = 2.0 / freq
    alone = collections.Counter()
    for c in (0, 1):
        other = per_cpu[1 - c]
        for r in per_cpu[c]:
            if waiting(r, pid2):
                continue
            k = bisect.bisect_left(times[1 - c], r[0])
            near = [other[i] for i in (k - 1, k) if 0 <= i < len(other)]
            if near:
                q = min(near, key=lambda q: abs(q[0] - r[0]))
                if abs(q[0] - r[0]) < window and waiting(q, pid2):
                    alone[('main' if r[2] == pid2 else 'worker', r[4])] += 1
    wall2 = span2 * freq
    # CPU ms per training step of each function, one thread and two.
    per_step = lambda rows, span, step: {
        k: v / freq / span * step for k, v in collections.Counter(r[4] for r in rows).items()}
    f1, f2 = per_step(work1, span1, step1), per_step(work2, span2, step2)
    grew = sorted(f2, key=lambda k: -(f2[k] - f1.get(k, 0.0)))
    return {
        'model': model, 'd_model': d, 'seq_len': t,
        'step_ms': [step1, step2], 'speedup': round(step1 / step2, 3),
        'waiting': round(1 - busy2, 4), 'busy_one': round(busy1, 4), 'work': round(work, 3),
        'alone': round(sum(alone.values()) / wall2, 4),
        'alone_top': [[who, sym, round(n / wall2, 4)] for (who, sym), n in alone.most_common(6)],
        'grew_top': [[sym, round(f1.get(sym, 0.0), 2), round(f2[sym], 2)] for sym in grew[:4]],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', default='rnn,lstm,gru,mamba,rwkv,mingru,attention')
    p.add_argument('--d-models', default='64,128')
    p.add_argument('--seq-lens', default='256,1024')
    p.add_argument('--freq', type=int, default=4999, help='samples per second and CPU')
    p.add_argument('--json', action='store_true', help='one JSON line per shape')
    args = p.parse_args()
    if not 100 <= args.freq <= 20000:
        sys.exit('two_threads.py: --freq takes 100 to 20000 samples per second')
    root = os.path.dirname(os.path.abspath(__file__))
    target = os.environ.get('CARGO_TARGET_DIR', os.path.normpath(os.path.join(root, '..', '..', 'target')))
    binary = os.path.join(target, 'release', 'estafet')
    if subprocess.run(['perf', '--version'], capture_output=True).returncode != 0:
        sys.exit('two_threads.py: needs perf (linux-tools) on the PATH')
    if not os.access(binary, os.X_OK):
        sys.exit(f'two_threads.py: no release build at {binary} (cargo build --release)')
    try:
        shapes = [(m, int(d), int(t)) for d in args.d_models.split(',')
                  for t in args.seq_lens.split(',') for m in args.models.split(',')]
    except ValueError:
        sys.exit('two_threads.py: --d-models and --seq-lens take comma-separated integers')
    with tempfile.TemporaryDirectory() as workdir:
        for model, d, t in shapes:
            r = decompose(binary, model, d, t, args.freq, workdir)
            if args.json:
                print(json.dumps(r), flush=True)
                continue
            print(f"{model} d {d} T {t}: {r['step_ms'][0]:.1f} → {r['step_ms'][1]:.1f} ms per step, "
                  f"{r['speedup']:.2f}× = 2 · (1 − waiting {r['waiting']:.1%}) / "
                  f"(busy {r['busy_one']:.1%} · work {r['work']:.2f}); one CPU alone "
                  f"{r['alone']:.1%} of the time", flush=True)
            for who, sym, share in r['alone_top']:
                print(f"    alone {share:6.1%} {who:6} {sym}")
            for sym, a, b in r['grew_top']:
                print(f"    grew  {a:6.2f} → {b:6.2f} ms/step {sym}")


if __name__ == '__main__':
    main()
