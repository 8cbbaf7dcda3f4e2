"""The method comparison (the paper's Table 1 and its other settings), by one command each.

    python bench/compare.py --setting paper              # the paper's regime: client lr 0.01, 600 local steps
    python bench/compare.py --all                        # the four stress cells below, 5 seeds, 120 runs
    python bench/compare.py --all --closed-form          # and LoRA-FAIR's closed form in each (+40 runs)
    python bench/compare.py --setting feature            # Table 1: one client per style, ViT (stress: lr 0.06)
    python bench/compare.py --setting feature --backbone mixer
    python bench/compare.py --setting label              # 30 clients, 5 per style, Dirichlet(0.5) labels
    python bench/compare.py --setting partial            # 60 clients, 10 per style, 20% take part a round
    python bench/compare.py --ablations                  # LoRA-FAIR's ablations (feature, ViT)
    python bench/compare.py --ranks 4,8,16               # heterogeneous client ranks (feature, ViT)
    python bench/compare.py --setting paper --dp-epsilon 6,1   # DP-SGD clients (DP_METHODS), one cell per epsilon
    python bench/compare.py --dataset domainnet --data-root /data/domainnet --rounds 30 --local-epochs 1

Every variant runs train.py with the same settings, once per seed, `--jobs` at a time (separate
processes of one thread each; with --all the cells share one pool, longest runs first). Each cell
has its folder under --out (default bench/results). A run already there is reused when finished
and resumed when not, but only if its config.json records the same settings (otherwise this stops
and says what differs). A finished run needs only its config.json and metrics.jsonl, which are
committed: the same command rebuilds a committed table and its plots without rerunning anything.
A table is never overwritten by one of fewer seeds or variants (that goes to table-partial.md);
each names the sha256 of the embedded backbone it used. Writes to each cell's folder: table.md (per-domain top-1, mean +- std
over seeds, and each method's paired difference to FedIT over the same seeds with a 95% t
interval), curves.csv (per round: accuracy, cos(dW, dW_applied), FedIT's cosine and the ceiling of
any refined B), curves.png (accuracy per round) and bias.png (the cosines per round against the
ceiling).

The paper-regime cell (`--setting paper`, PAPER_REGIME) runs the paper's client lr 0.01 with one
client per style, batch 16 and rank 4: 600 images per style and 600 local steps in one round, chosen
with FedIT alone (and the centralised reference) as the first setting whose round-1 cos(dW, B_bar
A_bar) is about 0.95 (0.954), within 35 runs in about 75 minutes; 200-300 steps a round stayed
above 0.98 and the drift is gone by round 2 (bench/results/paper-regime-probes/). Its centralised
reference (3,600 steps on all 3,600 images) is its own. The other cells (STRESS) are stress tests:

The embedded task (`SHAPES`) was chosen once, with FedIT alone, before any other method was run:
30 classes (the generator's 0..9 and 40..59, none of them the backbones' pretraining classes),
150 training images per style, rank 4 (r / width as in the paper's ViT-B), 5 rounds, batch 16,
30 local steps per client with one client per style. At lr 0.06 FedIT's cos(dW, B_bar A_bar) is
0.84-0.92 and its accuracy about 71%; at lr 0.03 the cosine stayed above 0.98, at 0.01 above
0.999. Nothing is tuned per method.

The settings' local steps (SETTINGS) were chosen the same way. With 5 clients per style, 6 steps
each (the feature setting's 180 a round) left FedIT's cosine at 0.99997 (no bias: the label cell
of an earlier run of this table); 15 steps gave 0.997 / 0.981 in rounds 1 / 2 and 30 gave 0.935 /
0.870 (seed 0), at twice the cost again: the label and partial settings use 15. That choice came
after the other methods' 6-step label results had been seen; they are kept in
bench/results/shapes-label-vit-6steps/. The centralised
reference (one client, all the images) takes the setting's steps a round at lr 0.01, the largest
of {0.01, 0.02, 0.03} at which its accuracy did not oscillate round to round; it depends on
nothing else, so the cells that agree on backbone and steps share its runs
(bench/results/shapes-centralised-<backbone>-<steps>steps/).

The Mixer first ran at the ViT's lr 0.06 (bench/results/shapes-feature-mixer-lr0.06/): there
FedIT falls to 46%. Its lr was then chosen with FedIT alone (seed 0). At lr 0.02 / 0.03 / 0.04 /
0.045 FedIT's round-2 cosine is 0.999 / 0.996 / 0.986 / 0.970 and its final accuracy 79.5-80.2%,
within a point of the centralised reference, which stops near 80% because it has learnt its 900
images (training loss 0.05; it keeps the ViT's lr 0.01: seed 0 ends at 80.4% there, 80.1% at
0.02, and oscillates at 0.03); that cell, at 0.045, is kept
(bench/results/shapes-feature-mixer-lr0.045/). At 0.05 FedIT's cosine is 0.91-0.94 and its
accuracy flat at 74-76% over the rounds; at 0.055 it falls round over round (70% to 46-54%), as it
does with 60 local steps at 0.045 (69, 49, 34, 48%). The Mixer's lr is 0.05, the largest at which
FedIT does not fall: the ViT's rule. Both Mixer choices came after other methods' results at 0.06
(and 0.045) had been seen; all three cells are kept.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aggregators import AGGREGATORS  # noqa: E402
from backbone import SHAPES_MODELS, pretrained_shapes_backbone  # noqa: E402
import train  # noqa: E402

SHAPES = ["--num-classes", "30", "--n-train", "150", "--n-test", "200", "--rounds", "5", "--local-epochs", "100",
          "--batch-size", "16", "--rank", "4", "--eval-every", "1"]
LR = {"vit": "0.06", "mixer": "0.05"}   # client lr per backbone, each chosen with FedIT alone (module docstring)
SETTINGS = {   # federated arguments on the six styles
    "paper": ["--local-steps", "600"],                                                     # 6 clients x 600
    "feature": ["--local-steps", "30"],                                                    # 6 clients x 30
    "label": ["--clients-per-domain", "5", "--dirichlet", "0.5", "--local-steps", "15"],   # 30 x 15
    "partial": ["--clients-per-domain", "10", "--dirichlet", "0.5", "--participation", "0.2",
                "--local-steps", "15"],                                                    # 12 of 60 x 15
}
STRESS = ("feature", "label", "partial")   # the cells at the largest lr at which FedIT does not fall (LR)
PAPER_REGIME = ["--lr", "0.01", "--n-train", "600", "--rounds", "1"]   # the paper's client lr (docstring)
CENTRALISED = ["--method", "fedit", "--centralised", "--lr", "0.01"]   # + the setting's steps a round
SGD = {"lorafair sgd": ["--method", "lorafair", "--fair-solver", "sgd"]}   # the published solver, beside the default
LSQ = {   # LoRA-FAIR's closed-form objective (aggregators.lsq_residual): lam 0 (the projection) and the paper's lam
    "lorafair lsq lam 0": ["--method", "lorafair", "--fair-objective", "lsq", "--fair-lam", "0"],
    "lorafair lsq lam 0.01": ["--method", "lorafair", "--fair-objective", "lsq", "--fair-lam", "0.01"],
}
BACKBONES = {"vit": "vit_shapes", "mixer": "mixer_shapes"}
NEWER = ["fedsvd", "spectral", "frlora"]   # the field's newer methods, beside the paper's in the ViT cells
PAPER = {   # the paper's methods per table; the ViT feature setting runs every method here
    ("paper", "vit"): ["fedit", "ffa", "flora", "flexlora", "lorafair", *NEWER],
    ("feature", "vit"): [*list(AGGREGATORS)[:8], *NEWER],
    ("feature", "mixer"): ["fedit", "ffa", "flora", "flexlora", "lorafair"],
    ("label", "vit"): ["fedit", "flora", "flexlora", "lorafair"],
    ("partial", "vit"): ["fedit", "flora", "flexlora", "lorafair"],
}
DP_METHODS = ["fedit", "ffa", "lorafair"]   # under DP-SGD (--dp-epsilon), beside FedIT without it
ALL = [("feature", "vit"), ("feature", "mixer"), ("label", "vit"), ("partial", "vit")]
ABLATIONS = {   # each against LoRA-FAIR's defaults (first two rows: the runs of the method comparison); the
                # variants Eq. 8's fixed-point solver does not cover run with the published SGD
    "fedit": ["--method", "fedit"],
    "lorafair": ["--method", "lorafair"],                        # correct B, lam 0.01, dB from zeros
    "lorafair sgd": SGD["lorafair sgd"],                         # the published solver
    "correct A": ["--method", "lorafair", "--fair-correct", "A", "--fair-solver", "sgd"],
    "correct both": ["--method", "lorafair", "--fair-correct", "both", "--fair-solver", "sgd"],
    "lam 0": ["--method", "lorafair", "--fair-lam", "0"],
    "lam 0.001": ["--method", "lorafair", "--fair-lam", "0.001"],
    "lam 0.1": ["--method", "lorafair", "--fair-lam", "0.1"],
    "dB init xavier": ["--method", "lorafair", "--fair-init", "xavier", "--fair-solver", "sgd"],
    "column cosine": ["--method", "lorafair", "--fair-similarity", "column", "--fair-solver", "sgd"],
    "clients start fresh": ["--method", "lorafair", "--client-init", "fresh"],
    "clients start local": ["--method", "lorafair", "--client-init", "local"],
}
LABELS = {"hetlora": "hetlora (aggregation step only)"}
PALETTE = ["fedit", "lorafair", "ffa", "flora", "flexlora", "centralised", "fedex", "fedsa", "rolora", "lorafair sgd",
           "hetlora", "rbla", "florist", *NEWER, *LSQ, *(k for k in ABLATIONS if k not in ("fedit", "lorafair", "lorafair sgd"))]   # no rank self-pruning (docs/methods.md)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086]   # Student's t, 97.5% quantile, 1..20 degrees of freedom


def steps_a_round(argv: list[str]) -> int:
    """Local steps all clients of a round take together under the train.py arguments `argv` on
    the embedded data's six styles: the budget the centralised reference gets (which has one client)."""
    a = train.get_args_parser().parse_args(argv)
    clients = 1 if a.centralised else max(1, round(a.participation * 6 * a.clients_per_domain))   # as fed.sample
    return clients * (a.local_steps or 0)


def with_flags(argv: list[str], flags: list[str]) -> list[str]:
    """`argv` with each flag of `flags` set, so that each is stated once: a `--flag value` pair
    replaces the value in place or is appended; a bare `--flag` is appended unless present."""
    argv, i = list(argv), 0
    while i < len(flags):
        flag = flags[i]
        has_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        if flag not in argv:
            argv += flags[i:i + 1 + has_value]
        elif has_value:
            argv[argv.index(flag) + 1] = flags[i + 1]
        i += 1 + has_value
    return argv


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="shapes", choices=["shapes", "domainnet", "nicopp"], help="the data")
    p.add_argument("--data-root", default=None, help="DomainNet / NICO++: as train.py takes it")
    p.add_argument("--setting", default="feature", choices=list(SETTINGS),
                   help="the cell (module docstring); --ablations and --ranks run on it too")
    p.add_argument("--backbone", default="vit", choices=list(BACKBONES), help="shapes: the embedded ViT or Mixer")
    p.add_argument("--all", action="store_true", help="every (setting, backbone) cell of ALL, one after another")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated run seeds")
    p.add_argument("--only", default=None, help="comma-separated subset of the variants")
    p.add_argument("--ablations", action="store_true", help="run LoRA-FAIR's ablations instead of the methods")
    p.add_argument("--closed-form", action="store_true", help="add LoRA-FAIR's closed form (LSQ) at lam 0 and 0.01")
    p.add_argument("--ranks", default=None, help="heterogeneous client ranks for every variant, e.g. 4,8,16")
    p.add_argument("--dp-epsilon", default=None,
                   help="comma-separated budgets: a cell each of DP_METHODS with DP-SGD clients (delta 1e-5, clip 2) "
                        "and FedIT without DP (the cell's own runs, shared)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--replot", action="store_true", help="only redraw every cell's plots from its curves.csv")
    p.add_argument("--out", default=os.path.join("bench", "results"),
                   help="folder of every cell's results: <out>/<dataset>-<setting>-<backbone>[-...]")
    return p


def recorded_differences(argv: list[str], out: str) -> tuple[list[str], int]:
    """How the run recorded in <out>/config.json differs from what `argv` asks for (settings that
    change results; device, workers, other methods' options and the like do not), and the rounds it
    was run for."""
    with open(os.path.join(out, "config.json")) as f:
        old = json.load(f)
    new = train.effective(train.config_of(train.resolve(train.get_args_parser().parse_args([*argv, "--out", out]))))
    old = train.effective(old)
    defaults = vars(train.get_args_parser().parse_args([]))
    free = train.free_keys(new["method"])
    diff = [f"{k}: {old.get(k, defaults.get(k))!r} there, {new.get(k)!r} asked" for k in sorted(set(old) | set(new))
            if k not in free and old.get(k, defaults.get(k)) != new.get(k)]
    return diff, old["rounds"]


def plan(name: str, argv: list[str], out: str) -> list[str] | None:
    """The train.py command that brings `out` to what `argv` asks for; None when it is there already.

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
        if done == rounds and len(metrics(out)) == rounds:     # config.json and metrics.jsonl suffice
            print(f"== {name}: reusing {out} (same settings, {rounds} rounds)", file=sys.stderr)
            return None
    return [*argv, "--out", out, "--no-progress", *(["--resume"] if started else [])]


def run_all(jobs: list[tuple[str, list[str], str]], parallel: int) -> None:
    """Run the planned train.py commands, `parallel` processes at a time, one thread each.

    A run shared by several cells (the centralised reference) is planned by each but run once; the
    longest runs (most local steps a round) start first, so the pool does not end on one of them.
    A shapes backbone the runs need is pretrained here first (once, cached), not by two runs at once."""
    unique = {}
    for name, argv, out in jobs:
        if unique.setdefault(out, (name, argv))[1] != argv:
            raise SystemExit(f"{name}: two different runs planned into {out}")
    todo = [(name, cmd) for out, (name, argv) in unique.items() if (cmd := plan(name, argv, out)) is not None]
    todo.sort(key=lambda job: -steps_a_round(job[1]))
    for model in sorted({a.model for _, cmd in todo if (a := train.get_args_parser().parse_args(cmd)).pretrained
                         and not a.checkpoint and a.model in SHAPES_MODELS}):
        pretrained_shapes_backbone(model=model)   # once, here, rather than in two runs at once (then cached)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(item):
        i, (name, cmd) = item
        sys.stderr.write(f"== [{i + 1}/{len(todo)}] {name}: {' '.join(cmd)}\n")   # one write: no interleaving
        res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *cmd], env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stderr[-2000:]}")
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(one, enumerate(todo)))


def metrics(out: str) -> list[dict]:
    if not os.path.isfile(os.path.join(out, "metrics.jsonl")):
        return []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def backbone_note(base: list[str]) -> str:
    """The embedded backbone's file and sha256 (the weights every run of the table used), or ''."""
    a = train.get_args_parser().parse_args(base)
    if a.model not in SHAPES_MODELS or not a.pretrained or a.checkpoint:
        return ""
    import hashlib
    path = pretrained_shapes_backbone(model=a.model, progress=False)
    with open(path, "rb") as f:
        return f"Backbone: `{os.path.basename(path)}`, sha256 `{hashlib.sha256(f.read()).hexdigest()}`"


def keeps_a_fuller_table(out: str, seeds: list[int], names: list[str]) -> bool:
    """Whether <out>/table.md already holds more seeds, or variants these results lack: then it is
    not overwritten (a partial run writes table-partial.md beside it)."""
    path = os.path.join(out, "table.md")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        lines = f.read().splitlines()
    had = int(re.search(r"(\d+) seeds \(", lines[0]).group(1))
    rows = {line.split(" | ")[0].lstrip("| ").split(" (")[0] for line in lines if line.startswith("| ")
            and not line.startswith(("| method", "|---"))}
    return had > len(seeds) or not rows <= set(names)


def fmt(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def paired(xs: list[float], base: list[float]) -> str:
    """Mean paired difference (points) with its 95% t interval; '*' where the interval excludes 0."""
    d = [100 * (x - b) for x, b in zip(xs, base)]
    if len(d) < 2:
        return f"{d[0]:+.2f}"
    m, h = statistics.mean(d), T975[min(len(d) - 2, len(T975) - 1)] * statistics.stdev(d) / math.sqrt(len(d))
    return f"{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}]" + (" *" if m - h > 0 or m + h < 0 else "")


def cell(args, extra: list[str], setting: str, backbone: str, eps: str | None = None):
    """One (setting, backbone[, DP budget eps]): the train.py jobs (name, argv, out) of every
    variant and seed, and a function that writes the table and plots once they have run."""
    seeds = [int(s) for s in args.seeds.split(",")]
    shapes = args.dataset == "shapes"
    only = args.only.split(",") if args.only else []
    if args.ablations:
        variants = dict(ABLATIONS)
    elif eps:
        if "--clients-per-domain" in SETTINGS[setting] or not shapes:
            raise SystemExit("--dp-epsilon: the DP cells are the embedded data's settings of one client per style")
        variants = {m: ["--method", m, "--dp-epsilon", eps] for m in DP_METHODS}
        variants["fedit non-private"] = ["--method", "fedit"]
    else:
        methods = PAPER.get((setting, backbone), list(AGGREGATORS)) if shapes else list(AGGREGATORS)[:8]
        if args.ranks:
            methods = list(AGGREGATORS)
        variants = {m: ["--method", m] for m in methods}
        if "lorafair" in variants:
            variants.update(SGD)
        if (args.closed_form or set(only) & set(LSQ)) and not args.ranks:   # asked for, or named in --only
            variants.update(LSQ)
        if not args.ranks:
            variants["centralised"] = CENTRALISED if shapes else ["--method", "fedit", "--centralised"]
    if only:
        if unknown := [k for k in only if k not in variants]:
            known = [*variants, *(k for k in LSQ if k not in variants and not args.ranks and not args.ablations)]
            raise SystemExit(f"--only: no variant {', '.join(map(repr, unknown))} here; the variants are "
                             f"{', '.join(known)}")
        variants = {k: v for k, v in variants.items() if k in only}
    tag = f"{args.dataset}-{setting}-{backbone}" if shapes else args.dataset
    out = os.path.join(args.out, tag + ("-ablations" if args.ablations else "")
                       + (f"-ranks-{args.ranks.replace(',', '-')}" if args.ranks else "") + (f"-dp-eps{eps}" if eps else ""))
    base = ["--dataset", args.dataset] + (["--data-root", args.data_root] if args.data_root else [])
    if shapes:
        regime = PAPER_REGIME if setting == "paper" else ["--lr", LR[backbone]]
        base += with_flags(SHAPES, regime) + ["--model", BACKBONES[backbone]]
    base += extra + (["--ranks", args.ranks] if args.ranks else [])
    fed = SETTINGS[setting] if shapes else []
    steps = steps_a_round(fed) if shapes else None
    if shapes and "centralised" in variants:
        variants["centralised"] = variants["centralised"] + ["--local-steps", str(steps)]

    def argv(v):
        return with_flags(base, v) if "--centralised" in v else base + fed + v
    folder = {name: os.path.join(out, name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""))
              for name in variants}
    if shapes and not extra:            # runs that other cells (or the comparison) make the same way: shared
        if "centralised" in variants and setting in STRESS:   # depends on the backbone and the steps a round only
            folder["centralised"] = os.path.join(args.out, f"shapes-centralised-{backbone}-{steps}steps")
        if eps:                         # FedIT without DP: the cell's own runs
            folder["fedit non-private"] = os.path.join(args.out, f"shapes-{setting}-{backbone}", "fedit")
        if args.ablations:              # FedIT and LoRA-FAIR as they are: the runs of the method comparison
            for name in ("fedit", "lorafair", "lorafair sgd"):
                folder[name] = os.path.join(args.out, f"shapes-{setting}-{backbone}", name.replace(" ", "_"))
    jobs = [(name, argv(v) + ["--seed", str(s)], os.path.join(folder[name], f"seed{s}"))
            for name, v in variants.items() for s in seeds]

    def report():
        results = {name: [metrics(os.path.join(folder[name], f"seed{s}")) for s in seeds] for name in variants}
        suffix = "-partial" if keeps_a_fuller_table(out, seeds, list(variants)) else ""
        if suffix:
            print(f"{out}/table.md holds more seeds or variants than this run; writing table{suffix}.md, "
                  f"curves{suffix}.csv and plots beside it (the full table: the same command without "
                  "--only / with every seed)", file=sys.stderr)
        write_table(results, seeds, out, args, setting, backbone, base, fed, variants.get("centralised"), suffix, eps)
        write_curves(results, seeds, out, suffix)
        plot(series(results), out, tag, suffix)
    return jobs, report


def write_table(results, seeds, out, args, setting, backbone, base, fed, centralised=None, suffix="",
                eps=None) -> None:
    first = results[next(iter(results))][0][-1]["acc"]
    domains = [k for k in first if k != "mean"]
    ref = results.get("fedit") or results.get("lorafair")
    ref_name = "fedit" if "fedit" in results else "lorafair"
    regime = ""
    if args.dataset == "shapes":
        lr = train.get_args_parser().parse_args(base).lr
        regime = (f" (the paper's regime: client lr {lr:g}, {fed[-1]} local steps a client a round)"
                  if setting == "paper" else f" (STRESS TEST: client lr {lr:g}, the largest at which FedIT does "
                  "not fall; the paper's is 0.01)")
    lines = [f"{args.dataset}, setting {setting}, backbone {backbone}{regime}: {len(seeds)} seeds ({args.seeds}), top-1 % "
             "after the last round, mean ± std over seeds; Δ: paired difference to "
             f"{ref_name} over the same seeds, 95% t interval (each on its own, not adjusted for the number of "
             "rows), * where it excludes 0", "",
             "| method | " + " | ".join(domains) + f" | **mean** | Δ vs {ref_name} | Δ vs lorafair | cos(dW, applied) | "
             "FedIT's cos | ceiling | MB per round |", "|---|" + "---|" * (len(domains) + 7)]
    fair = results.get("lorafair")
    for name, runs in results.items():
        cells = [fmt([r[-1]["acc"][d] for r in runs]) for d in domains]
        mean = [r[-1]["acc"]["mean"] for r in runs]
        delta = "" if runs is ref or ref is None else paired(mean, [r[-1]["acc"]["mean"] for r in ref])
        delta_fair = paired(mean, [r[-1]["acc"]["mean"] for r in fair]) if fair and name != "lorafair" else ""
        avg = lambda key: statistics.mean(statistics.mean(rec[key] for rec in r) for r in runs)   # noqa: E731
        has = all(key in rec for r in runs for rec in r for key in ("cos_fedit", "ceiling"))
        wire = [(rec["bytes"]["up"] + rec["bytes"]["down"]) / 1e6 for r in runs for rec in r if "bytes" in rec]
        bias = f"{avg('cos_fedit'):.4f} | {avg('ceiling'):.4f}" if has else "n/a | n/a"   # older runs: n/a
        mb = f"{statistics.mean(wire):.3f}" if wire else "n/a"
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + f" | **{fmt(mean)}** | {delta} | "
                     f"{delta_fair} | {avg('cos'):.4f} | {bias} | {mb} |")
    if eps:
        lines += ["", privacy_note(results, base + fed, eps)]
    lines += ["", "Command: `python bench/compare.py " + " ".join(sys.argv[1:]) + "`",
              "Settings: `" + " ".join(base + fed) + "`"
              + (f" (centralised: `{' '.join(centralised)}`)" if centralised else "")]
    note = backbone_note(base)
    if note:
        lines.append(note)
        old = os.path.join(out, "table.md")
        recorded = [x for x in open(old).read().splitlines() if x.startswith("Backbone:")] if os.path.isfile(old) else []
        if recorded and recorded[0] != note:
            print(f"warning: {old} was made with another backbone ({recorded[0]}); this one is {note}",
                  file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"table{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def privacy_note(results, argv: list[str], eps: str) -> str:
    """What the DP rows spent, as the DP literature reports it: the runs' own records (metrics.jsonl's
    "dp"), checked against dp.py's numbers for the cell (every client holds its style's n_train
    images and is in every round; records written before "dp" held more than epsilon have only that)."""
    import dp
    import fed
    a = train.resolve(train.get_args_parser().parse_args([*argv, "--dp-epsilon", eps]))
    if a.participation != 1 or a.clients_per_domain != 1:
        raise SystemExit("privacy_note: the DP cells have one client per style, each in every round")
    q = a.batch_size / a.n_train
    steps = a.rounds * fed.step_count(dp.poisson_batches(q), train.fed_config(a))
    sigma = dp.noise_multiplier(float(eps), a.dp_delta, q, steps)
    recs = [r[-1]["dp"] for runs in results.values() for r in runs if "dp" in r[-1]]
    for d in recs:
        for key, want in (("noise_multiplier", sigma), ("sample_rate", q), ("steps", steps)):
            if any(v != want for v in d.get(key, {}).values()):
                raise SystemExit(f"privacy_note: a run's {key} is not the cell's {want}")
    spent = [e for d in recs for e in d["epsilon"].values()]
    return (f"Privacy (rows {', '.join(DP_METHODS)}): each client's records ({eps}, {a.dp_delta:g})-DP over the run "
            f"(add/remove one record), record-level DP-SGD through Opacus, {dp.ACCOUNTANT.upper()} accountant; "
            f"noise multiplier {sigma:.4f}, clip {a.dp_clip:g}, sample rate {q:.4f} (Poisson, batch {a.batch_size} of "
            f"{a.n_train}), {steps} steps a client; epsilon spent {min(spent):.3f}..{max(spent):.3f}; noise drawn from "
            "each run's seed. fedit non-private: the same runs without DP.")


def write_curves(results, seeds, out, suffix="") -> None:
    with open(os.path.join(out, f"curves{suffix}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "round", "mean_acc", "cos", "cos_fedit", "ceiling", "rel_err", "train_loss",
                    "scale", "eq8_0", "eq8"])
        for name, runs in results.items():
            for s, r in zip(seeds, runs):
                for rec in r:
                    w.writerow([name, s, rec["round"], rec.get("acc", {}).get("mean", ""), rec["cos"],
                                rec.get("cos_fedit", ""), rec.get("ceiling", ""), rec["rel_err"], rec["train_loss"],
                                rec.get("scale", ""), rec.get("eq8_0", ""), rec.get("eq8", "")])


def series(results) -> dict:
    """{variant: {key: [mean over seeds, per round]}} for the plots, keys round, acc (%), cos,
    ceiling, scale (a key some runs lack is left out)."""
    out = {}
    for name, runs in results.items():
        n = min(len(r) for r in runs)
        rated = [i for i in range(n) if all("acc" in r[i] for r in runs)]      # --eval-every > 1: some rounds
        out[name] = {"round": [runs[0][i]["round"] for i in range(n)], "acc_round": [runs[0][i]["round"] for i in rated],
                     "acc": [statistics.mean(100 * r[i]["acc"]["mean"] for r in runs) for i in rated]}
        for key in ("cos", "ceiling", "scale"):
            if all(key in r[i] and r[i][key] != "" for r in runs for i in range(n)):
                out[name][key] = [statistics.mean(float(r[i][key]) for r in runs) for i in range(n)]
    return out


def series_from_csv(path: str) -> dict:
    """The same from a committed curves.csv (so that plots are redrawn without the runs)."""
    runs = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            rec = {"round": int(row["round"]), **{k: row[k] for k in ("cos", "ceiling", "scale") if row.get(k, "") != ""},
                   **({"acc": {"mean": float(row["mean_acc"])}} if row["mean_acc"] != "" else {})}
            runs.setdefault(row["variant"], {}).setdefault(row["seed"], []).append(rec)
    return series({name: list(seeds.values()) for name, seeds in runs.items()})


def plot(data: dict, out: str, title: str, suffix: str = "") -> None:
    """curves.png (accuracy per round) and bias.png (cosine to dW against the ceiling, and the
    applied update's scale) from `series`: one colour and line style per variant, integer rounds,
    legends beside the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    names = list(data)
    colour = [plt.cm.tab10(i) for i in range(10)] + [plt.cm.tab20(2 * i + 1) for i in range(10)]   # 20 hues
    order = [n for n in [*PALETTE, *names] if n in names]             # fixed order: FedIT, then LoRA-FAIR, ...
    order = list(dict.fromkeys(order))
    style = {name: dict(color=colour[i % 20], ls=("-", "--", "-.", (0, (1, 1)))[i % 4], marker="osD^v<>ph*"[i % 10],
                        ms=4) for i, name in enumerate(order)}

    rounds = sorted({r for d in data.values() for r in d["round"]})

    def finish(fig, axes, path):
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if len(rounds) == 1:                 # one round (the paper-regime cell): one tick, centred
                ax.set_xticks(rounds)
                ax.set_xlim(rounds[0] - 0.5, rounds[0] + 0.5)
        fig.tight_layout()
        handles, labels = axes[0].get_legend_handles_labels()     # every variant the first axes shows
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.93), fontsize=8, frameon=False)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in names:
        ax.plot(data[name]["acc_round"], data[name]["acc"], label=LABELS.get(name, name), **style[name])
    ax.set(xlabel="round", ylabel="mean top-1 (%), mean over seeds", title=f"{title}: the global model")
    finish(fig, [ax], os.path.join(out, f"curves{suffix}.png"))

    biased = [n for n in names if n != "centralised" and "ceiling" in data[n]]
    if not biased:                              # runs logged before the ceiling: no bias plot
        return
    scaled = any("scale" in data[n] for n in biased)          # runs logged before the scale have none
    fig, axes = plt.subplots(1, 1 + scaled, figsize=(12 if scaled else 6.5, 4.2), squeeze=False)
    ax, bx = axes[0][0], axes[0][-1]
    for name in biased:
        d = data[name]
        ax.plot(d["round"], d["cos"], label=LABELS.get(name, name), **style[name])
        ax.plot(d["round"], d["ceiling"], color=style[name]["color"], ls=":", lw=1, marker="_", ms=14)
        if "scale" in d:
            bx.plot(d["round"], d["scale"], label=LABELS.get(name, name), **style[name])
    ax.set(xlabel="round", ylabel="cos(dW, applied), mean over layers and seeds",
           title="cosine to dW (dotted / dash: the ceiling of any refined B)")
    if scaled:
        bx.set(xlabel="round", ylabel="||applied|| / ||dW||, mean over layers and seeds", yscale="log",
               title="scale of the applied update (1: that of dW)")
        bx.axhline(1.0, color="grey", lw=0.5)
    fig.suptitle(title)
    finish(fig, list(axes[0]), os.path.join(out, f"bias{suffix}.png"))


def refill_fair_column(table: str, csv_path: str) -> None:
    """Fill a table's "Δ vs lorafair" column for every row from curves.csv (each seed's last
    round), for tables written when it held LoRA-FAIR's own variants only."""
    final = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row["mean_acc"] != "":
                final.setdefault(row["variant"], {})[int(row["seed"])] = (int(row["round"]), float(row["mean_acc"]))
    if "lorafair" not in final:
        return
    seeds = sorted(final["lorafair"])
    fair = [final["lorafair"][s][1] for s in seeds]
    with open(table) as f:
        lines = f.read().split("\n")
    head = next((i for i, line in enumerate(lines) if line.startswith("| method |")), None)
    if head is None or "Δ vs lorafair" not in lines[head]:
        return
    col = lines[head].split(" | ").index("Δ vs lorafair")
    for i in range(head + 2, len(lines)):
        cells = lines[i].split(" | ")
        name = next((n for n in final if LABELS.get(n, n) == cells[0].lstrip("| ")), None)
        if not lines[i].startswith("| ") or name in (None, "lorafair") or sorted(final[name]) != seeds:
            continue
        cells[col] = paired([final[name][s][1] for s in seeds], fair)
        lines[i] = " | ".join(cells)
    with open(table, "w") as f:
        f.write("\n".join(lines))


def replot(root: str) -> list[str]:
    """Redraw the plots of every cell under `root` from its committed curves.csv, and fill its
    table's Δ vs lorafair column."""
    done = []
    for cell in sorted(os.listdir(root)):
        for suffix in ("", "-partial"):
            path = os.path.join(root, cell, f"curves{suffix}.csv")
            if os.path.isfile(path):
                plot(series_from_csv(path), os.path.join(root, cell), cell, suffix)
                if os.path.isfile(table := os.path.join(root, cell, f"table{suffix}.md")):
                    refill_fair_column(table, path)
                done.append(path)
    return done


def main(argv=None):
    args, extra = get_args_parser().parse_known_args(argv)
    if args.replot:
        print("\n".join(f"redrew the plots of {path}" for path in replot(args.out)))
        return
    cells = [cell(args, extra, setting, backbone, eps) for setting, backbone in
             (ALL if args.all else [(args.setting, args.backbone)])
             for eps in (args.dp_epsilon.split(",") if args.dp_epsilon else [None])]
    try:
        run_all([job for jobs, _ in cells for job in jobs], args.jobs)   # one pool: no cell waits for another's tail
    except KeyboardInterrupt:
        raise SystemExit("interrupted: finished runs are kept; the same command resumes the others") from None
    for _, report in cells:
        report()


if __name__ == "__main__":
    main()
