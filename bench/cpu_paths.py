"""How far a comparison cell's results move with the CPU: the same runs under other CPUs' kernels.

    python bench/cpu_paths.py --setting paper --only fedit,lorafair        # 5 seeds x 2 variants x 2 paths
    python bench/cpu_paths.py --setting feature --only fedit,lorafair

A CPU picks its kernels at run time: ATen's vectorised code path (AVX512, AVX2 or plain C++, forced
on this machine by ATEN_CPU_CAPABILITY) and MKL's (forced by MKL_CBWR). Each path rounds the last
bits of a float32 sum its own way. This reruns the named variants of a bench/compare.py cell, same
seeds, settings and shipped backbone, under each path of PATHS (each a compare.py run into
<out>/<path>/, resumable like any), and writes <out>/table.md: per path, each variant's mean top-1
and its paired difference to the first variant, the per-seed differences, and how far a seed's
accuracy moves with the path next to how far it moves with the seed. The cell's own runs
(bench/results/<cell>/, made under the path of the machine that made them) are the first row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import compare  # noqa: E402

PATHS = {   # name: the environment that selects another CPU's kernels on this one
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "default-sse4_2": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2"},
}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="paper", choices=list(compare.SETTINGS))
    p.add_argument("--backbone", default="vit", choices=list(compare.BACKBONES))
    p.add_argument("--only", default="fedit,lorafair", help="variants of the cell; the first is the reference")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--paths", default=",".join(PATHS), help=f"code paths to run, of {', '.join(PATHS)}")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--home", default=os.path.join("bench", "results"), help="where the cell's own runs are")
    p.add_argument("--out", default=None, help="default: <home>/shapes-<setting>-<backbone>-cpu-paths")
    return p


def capability(env: dict) -> str:
    """The ATen code path a process started with `env` uses (what torch reports, not what was asked)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def final_means(root: str, cell: str, names: list[str], seeds: list[int]) -> dict[str, list[float]]:
    """{variant: final mean top-1 per seed} of the runs under <root>/<cell>/<variant>/seed<s>, or,
    for a committed cell whose run folders were not kept, of its curves.csv (each seed's last round)."""
    out, table = {}, os.path.join(root, cell, "curves.csv")
    for name in names:
        runs = [compare.metrics(os.path.join(root, cell, name.replace(" ", "_"), f"seed{s}")) for s in seeds]
        if not all(runs) and os.path.isfile(table):
            import csv
            with open(table) as f:
                rows = [r for r in csv.DictReader(f) if r["variant"] == name and r["mean_acc"] != ""]
            last = {}
            for r in rows:                   # the last evaluated round of each seed
                last[int(r["seed"])] = max(last.get(int(r["seed"]), (0, 0.0)), (int(r["round"]), float(r["mean_acc"])))
            runs = [r or ([{"acc": {"mean": last[s][1]}}] if s in last else []) for s, r in zip(seeds, runs)]
        if missing := [s for s, r in zip(seeds, runs) if not r]:
            raise SystemExit(f"{root}/{cell}/{name}: no runs for seeds {missing}; run bench/compare.py "
                             f"--setting ... --only {name} first")
        out[name] = [r[-1]["acc"]["mean"] for r in runs]
    return out


def table(rows: dict[str, dict[str, list[float]]], seeds: list[int], cell: str) -> list[str]:
    """Markdown: per code path, each variant's mean +- std, paired difference to the first variant,
    per-seed differences; then each variant's spread over paths next to its spread over seeds."""
    names = list(next(iter(rows.values())))
    ref = names[0]
    lines = [f"{cell}: the same runs under other CPUs' code paths, {len(seeds)} seeds ({','.join(map(str, seeds))}), "
             f"top-1 % after the last round; Δ: paired difference to {ref} with its 95% t interval (* excludes 0)", "",
             "| code path | " + " | ".join(names) + " | " + " | ".join(f"Δ {n}" for n in names[1:])
             + " | " + " | ".join(f"{n} − {ref} per seed" for n in names[1:]) + " |",
             "|---|" + "---|" * (2 * len(names) - 1 + len(names) - 1)]
    for path, acc in rows.items():
        per_seed = [", ".join(f"{100 * (x - b):+.1f}" for x, b in zip(acc[n], acc[ref])) for n in names[1:]]
        lines.append(f"| {path} | " + " | ".join(compare.fmt(acc[n]) for n in names) + " | "
                     + " | ".join(compare.paired(acc[n], acc[ref]) for n in names[1:]) + " | "
                     + " | ".join(per_seed) + " |")
    lines += ["", "How far one seed moves with the code path, against how far the mean moves with the seed "
              "(points):", "", "| variant | range over paths, mean over seeds (max) | std over seeds, mean over paths |",
              "|---|---|---|"]
    for n in [*names, *(f"{n} − {ref}" for n in names[1:])]:
        if " − " in n:
            v = n.split(" − ")[0]
            by = {p: [x - b for x, b in zip(acc[v], acc[ref])] for p, acc in rows.items()}
        else:
            by = {p: acc[n] for p, acc in rows.items()}
        ranges = [100 * (max(col) - min(col)) for col in zip(*by.values())]
        std = statistics.mean(100 * statistics.stdev(xs) for xs in by.values()) if len(seeds) > 1 else float("nan")
        lines.append(f"| {n} | {statistics.mean(ranges):.2f} ({max(ranges):.2f}) | {std:.2f} |")
    return lines


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    cell = f"shapes-{args.setting}-{args.backbone}"
    out = args.out or os.path.join(args.home, f"{cell}-cpu-paths")
    names, seeds = args.only.split(","), [int(s) for s in args.seeds.split(",")]
    if unknown := [p for p in args.paths.split(",") if p not in PATHS]:
        raise SystemExit(f"--paths: no code path {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    flags = ["--setting", args.setting, "--backbone", args.backbone, "--only", args.only, "--seeds", args.seeds,
             "--jobs", str(args.jobs)]
    rows = {f"the cell's own runs (`{os.path.join(args.home, cell)}/`)":
            final_means(args.home, cell, names, seeds)}
    for path in args.paths.split(","):
        env = {**os.environ, **PATHS[path]}
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare.py"), *flags,
                        "--out", os.path.join(out, path)], env=env, check=True)
        asked = " ".join(f"{k}={v}" for k, v in PATHS[path].items())
        rows[f"`{asked}` ({capability(env)})"] = final_means(os.path.join(out, path), cell, names, seeds)
    lines = table(rows, seeds, cell) + ["", f"Command: `python bench/cpu_paths.py {' '.join(sys.argv[1:])}`; "
                                        f"run records: `<path>/{cell}/<variant>/seed<s>/`"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
