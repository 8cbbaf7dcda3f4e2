"""Rerun one committed run of every comparison cell and check that it reproduces its record.

    python bench/reproduce.py --out /tmp/reproduce           # 9 runs (seed 0), about 15 minutes on 2 cores

Each run is made as bench/compare.py makes it (same arguments, same shipped backbone) into --out,
then its metrics.jsonl is compared with the committed one under bench/results/, every field but the
timings (`seconds`). Printed per run: the fields that differ and their largest relative difference.
Bit-for-bit equality holds on the machine and code path that made the committed runs
(docs/training.md, "Repeatability"); another CPU's kernels move the last bits (bench/cpu_paths.py measures how far).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import compare  # noqa: E402

CELLS = [   # (compare.py arguments, variant): one run of each committed cell, a folding method too
    (["--setting", "paper"], "lorafair"),
    (["--setting", "paper"], "flora"),
    (["--setting", "feature"], "lorafair"),
    (["--setting", "feature", "--backbone", "mixer"], "lorafair"),
    (["--setting", "label"], "lorafair"),
    (["--setting", "partial"], "lorafair"),
    (["--setting", "feature", "--ablations"], "lam 0"),
    (["--setting", "feature", "--ranks", "4,8,16"], "lorafair"),
    (["--setting", "feature", "--ranks", "2,4,8"], "florist"),
]


def flat(record: dict, prefix: str = "") -> dict:
    """A metrics.jsonl record as {'a.b.c': value}, without its timings."""
    out = {}
    for k, v in record.items():
        if k == "seconds" and not prefix:
            continue
        key = f"{prefix}.{k}" if prefix else k
        out.update(flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def differences(committed: str, rerun: str) -> tuple[list[str], float]:
    """Fields (layers collapsed to 'layers.*.<field>') where two metrics.jsonl differ, and the largest
    relative difference of a float among them; a missing or extra round or field counts too."""
    a = [flat(json.loads(line)) for line in open(committed)]
    b = [flat(json.loads(line)) for line in open(rerun)]
    fields, worst = set() if len(a) == len(b) else {"rounds"}, 0.0
    for x, y in zip(a, b):
        for k in x.keys() | y.keys():
            if x.get(k) != y.get(k):
                parts = k.split(".")
                fields.add(f"layers.*.{parts[-1]}" if parts[0] == "layers" else k)
                if isinstance(x.get(k), float) and isinstance(y.get(k), float):
                    worst = max(worst, abs(x[k] - y[k]) / max(abs(x[k]), 1e-300))
    return sorted(fields), worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="where the reruns go (not bench/results)")
    p.add_argument("--home", default=os.path.join(ROOT, "bench", "results"), help="the committed runs")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    if os.path.abspath(args.out) == os.path.abspath(args.home):
        raise SystemExit("--out must not be the committed results' folder")
    jobs, pairs = [], []
    for cell_args, variant in CELLS:
        cargs, extra = compare.get_args_parser().parse_known_args(
            [*cell_args, "--only", variant, "--seeds", "0", "--out", args.out])
        for name, run_argv, out in compare.cell(cargs, extra, cargs.setting, cargs.backbone)[0]:
            jobs.append((name, run_argv, out))
            pairs.append((os.path.join(args.home, os.path.relpath(out, args.out)), out))
    compare.run_all(jobs, args.jobs)
    same = 0
    for committed, rerun in pairs:
        fields, worst = differences(os.path.join(committed, "metrics.jsonl"), os.path.join(rerun, "metrics.jsonl"))
        same += not fields
        print(f"{os.path.relpath(committed, args.home)}: " + ("reproduced" if not fields else
              f"differs in {', '.join(fields)} (largest relative difference {worst:.1e})"))
    print(f"{same} of {len(pairs)} runs reproduced every field but the timings")
    return 0 if same == len(pairs) else 1


if __name__ == "__main__":
    sys.exit(main())
