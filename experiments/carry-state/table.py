#!/usr/bin/env python3
"""Scores every run of the carry-state sweeps both ways and prints the README's table.

    python3 experiments/carry-state/table.py ESTAFET RUNS_DIR

RUNS_DIR holds the sweeps' output folders (T64/, T512/). Each run is evaluated on its
validation split as independent windows from a zero state (`estafet eval RUN --streams 0`,
128 windows, the run's seed) and as one stream with the state carried (`--streams 1`); the
table gives validation bits per character, the mean over seeds, for every model, corpus,
window length and training regime. Results are cached in RUNS_DIR/both-ways.json.
"""

import json
import pathlib
import re
import statistics
import subprocess
import sys


def bpc(estafet, run, streams):
    out = subprocess.run([estafet, "eval", str(run), "--streams", str(streams), "--samples", "128"],
                         check=True, capture_output=True, text=True).stdout
    # The first row of the table is the run's own window length.
    row = out.strip().splitlines()[2].split()
    return float(row[2])


def main():
    estafet, root = sys.argv[1], pathlib.Path(sys.argv[2])
    cache_path = root / "both-ways.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows = {}
    for run in sorted(root.glob("T*/*/summary.json")):
        run = run.parent
        name = f"{run.parent.name}/{run.name}"
        if name not in cache:
            cache[name] = {"windows": bpc(estafet, run, 0), "stream": bpc(estafet, run, 1)}
            cache_path.write_text(json.dumps(cache, indent=1))
        m = re.match(r"(.+)-(relay|vim-manual)-carry_state(true|false)-seed(\d+)", run.name)
        model, corpus, carry, _ = m.groups()
        key = (corpus, model, run.parent.name, carry == "true")
        rows.setdefault(key, []).append(cache[name])
    print("| corpus | model | window | trained | windows from zero | one stream, carried |")
    print("|---|---|---|---|---|---|")
    for (corpus, model, window, carry), runs in sorted(rows.items()):
        mean = lambda k: statistics.mean(r[k] for r in runs)  # noqa: E731
        seeds = lambda k: ", ".join(f"{r[k]:.3f}" for r in runs)  # noqa: E731
        trained = "carried state" if carry else "independent windows"
        print(f"| {corpus} | {model} | {window[1:]} | {trained} | "
              f"{mean('windows'):.3f} ({seeds('windows')}) | {mean('stream'):.3f} ({seeds('stream')}) |")


if __name__ == "__main__":
    main()
