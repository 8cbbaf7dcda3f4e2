"""The method comparison (the paper's Table 1) and its ablations, by one command.

    python bench/compare.py                          # every method + centralised, 3 seeds, embedded data
    python bench/compare.py --ablations              # LoRA-FAIR's ablations instead
    python bench/compare.py --ranks 4,8,16           # heterogeneous client ranks, cycled over the clients
    python bench/compare.py --dataset domainnet --data-root /data/domainnet --rounds 30 --local-epochs 1

Every variant runs train.py with the same settings, once per seed; a run already in --out is
reused when finished and resumed when not, but only if its config.json records the same settings
(otherwise compare.py stops and says what differs). Writes to --out: table.md (per-domain top-1, mean +- std over
seeds, the paper's layout), curves.csv (per round: mean accuracy, cos(dW, dW_applied),
relative error), curves.png (mean accuracy and cos per round, per variant).

The embedded setting makes aggregation matter: 40 local steps of batch 16 at lr 0.03 per round on
six distinct styles, so the clients drift apart (FedIT's cos(dW, B_bar A_bar) about 0.97-0.99,
against 0.9999 for the default run). lr 0.03 was chosen once, with FedIT, as the largest of
{0.01, 0.02, 0.03, 0.05} whose local training stayed stable (at 0.05 FedIT's loss rose round
over round); it is the same for every method; nothing here is tuned per method.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aggregators import AGGREGATORS  # noqa: E402
import train  # noqa: E402

METHODS = {m: ["--method", m] for m in AGGREGATORS}
METHODS["centralised"] = ["--method", "fedit", "--centralised"]   # one client, all data: no aggregation
ABLATIONS = {
    "lorafair (correct B, lam 0.01)": ["--method", "lorafair"],
    "correct A": ["--method", "lorafair", "--fair-correct", "A"],
    "correct both": ["--method", "lorafair", "--fair-correct", "both"],
    "lam 0": ["--method", "lorafair", "--fair-lam", "0"],
    "lam 0.001": ["--method", "lorafair", "--fair-lam", "0.001"],
    "lam 0.1": ["--method", "lorafair", "--fair-lam", "0.1"],
    "dB init xavier": ["--method", "lorafair", "--fair-init", "xavier"],
    "column cosine": ["--method", "lorafair", "--fair-similarity", "column"],
    "clients start fresh": ["--method", "lorafair", "--client-init", "fresh"],
    "clients start local": ["--method", "lorafair", "--client-init", "local"],
}
EMBEDDED = ["--rounds", "6", "--local-epochs", "100", "--local-steps", "40", "--batch-size", "16",
            "--lr", "0.03", "--eval-every", "1"]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="shapes", choices=["shapes", "domainnet", "nicopp"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default=None, help="comma-separated subset of the variants")
    p.add_argument("--ablations", action="store_true", help="run LoRA-FAIR's ablations instead of the methods")
    p.add_argument("--ranks", default=None, help="heterogeneous client ranks for every variant, e.g. 4,8,16")
    p.add_argument("--out", default=None, help="default bench/results/<dataset>[-ablations][-ranks-4-8-16]")
    return p


def recorded_differences(argv: list[str], out: str) -> tuple[list[str], int]:
    """How the run recorded in <out>/config.json differs from what `argv` asks for (settings that
    change results; device, workers and the like do not), and the rounds it was run for."""
    with open(os.path.join(out, "config.json")) as f:
        old = json.load(f)
    new = train.config_of(train.resolve(train.get_args_parser().parse_args([*argv, "--out", out])))
    defaults = vars(train.get_args_parser().parse_args([]))
    free = train.RESUME_FREE
    diff = [f"{k}: {old.get(k, defaults.get(k))!r} there, {new.get(k)!r} asked" for k in sorted(set(old) | set(new))
            if k not in free and old.get(k, defaults.get(k)) != new.get(k)]
    return diff, old["rounds"]


def run_variant(name: str, argv: list[str], out: str) -> list[dict]:
    """Run, resume or reuse one variant for one seed; return its metrics records.

    A run already in `out` is reused (finished) or continued (stopped early, or asked for more
    rounds) only when its recorded settings equal the requested ones; otherwise this stops and
    says what differs, so a table never shows old numbers under new settings."""
    started = os.path.isfile(os.path.join(out, "config.json"))
    rounds = train.resolve(train.get_args_parser().parse_args([*argv, "--out", out])).rounds
    if started:
        diff, done = recorded_differences(argv, out)
        if diff:
            raise SystemExit(f"{name}: {out} holds a run with other settings ({'; '.join(diff[:3])}); "
                             "pass another --out, or delete that folder to rerun it")
        if done > rounds:
            raise SystemExit(f"{name}: {out} holds a run of {done} rounds, {rounds} asked; pass another --out")
    if started and done == rounds and os.path.isfile(os.path.join(out, "final.safetensors")):
        print(f"== {name}: reusing {out} (same settings, {rounds} rounds)", file=sys.stderr)
    else:
        print(f"== {name}: {' '.join(argv)}" + (" (continuing the run there)" if started else ""), file=sys.stderr)
        if train.main([*argv, "--out", out, "--no-progress", *(["--resume"] if started else [])]) != 0:
            raise SystemExit(f"{name} failed; see the error above")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fmt(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main(argv=None):
    args, extra = get_args_parser().parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = ABLATIONS if args.ablations else METHODS
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    out = args.out or os.path.join("bench", "results", args.dataset + ("-ablations" if args.ablations else "")
                                   + (f"-ranks-{args.ranks.replace(',', '-')}" if args.ranks else ""))
    base = ["--dataset", args.dataset] + (["--data-root", args.data_root] if args.data_root else [])
    base += (EMBEDDED if args.dataset == "shapes" else []) + extra + (["--ranks", args.ranks] if args.ranks else [])

    results: dict[str, list[list[dict]]] = {}
    for name, v in variants.items():
        v = list(v)
        if "--centralised" in v and args.dataset == "shapes":   # same images per round as all clients together
            v += ["--local-steps", str(40 * 6)]
        results[name] = [run_variant(name, base + v + ["--seed", str(s)],
                                     os.path.join(out, name.replace(" ", "_").replace(",", ""), f"seed{s}"))
                         for s in seeds]

    domains = [k for k in results[next(iter(results))][0][-1]["acc"] if k != "mean"]
    lines = [f"{args.dataset}, {len(seeds)} seeds ({args.seeds}), top-1 % of the global model after the last round, "
             "mean ± std over seeds", "",
             "| method | " + " | ".join(domains) + " | **mean** | cos(dW, applied) | MB per round (up + down) |",
             "|---|" + "---|" * (len(domains) + 3)]
    for name, runs in results.items():
        cells = [fmt([r[-1]["acc"][d] for r in runs]) for d in domains]
        cos = statistics.mean(statistics.mean(rec["cos"] for rec in r) for r in runs)
        wire = [(rec["bytes"]["up"] + rec["bytes"]["down"]) / 1e6 for r in runs for rec in r if "bytes" in rec]
        mb = f"{statistics.mean(wire):.3f}" if wire else "n/a"            # runs from before the count: n/a
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{fmt([r[-1]['acc']['mean'] for r in runs])}** "
                     f"| {cos:.4f} | {mb} |")
    lines += ["", "Command: `python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
              "Settings: `" + " ".join(base) + "`"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    with open(os.path.join(out, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "round", "mean_acc", "cos", "rel_err", "train_loss"])
        for name, runs in results.items():
            for s, r in zip(seeds, runs):
                for rec in r:
                    w.writerow([name, s, rec["round"], rec.get("acc", {}).get("mean", ""), rec["cos"], rec["rel_err"],
                                rec["train_loss"]])
    plot(results, os.path.join(out, "curves.png"), args.dataset)


def plot(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        rounds = [rec["round"] for rec in runs[0] if "acc" in rec]
        acc = [statistics.mean(100 * r[i]["acc"]["mean"] for r in runs) for i, rec in enumerate(runs[0]) if "acc" in rec]
        ax1.plot(rounds, acc, marker="o", ms=3, label=name)
        ax2.plot([rec["round"] for rec in runs[0]],
                 [statistics.mean(r[i]["cos"] for r in runs) for i in range(len(runs[0]))], marker="o", ms=3, label=name)
    ax1.set(xlabel="round", ylabel="mean top-1 (%)", title=f"{title}: global model accuracy")
    ax2.set(xlabel="round", ylabel="cos(dW, dW applied)", title="aggregation fidelity, mean over layers")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
