"""Federated LoRA fine-tuning, the single entrypoint.

    python train.py                                     # embedded 'shapes' dataset, offline, minutes on CPU
    python train.py --method lorafair --dataset domainnet --data-root /data/domainnet
    python train.py --dataset nicopp --data-root /data/nicopp --model mixer_b16_224.goog_in21k

Defaults that differ per dataset are in DATASET_DEFAULTS (the paper's values for DomainNet and
NICO++; small, CPU-sized ones for the embedded dataset). Output in --out: config.json,
metrics.jsonl (one record per round), checkpoint.safetensors (every round, atomic),
final.safetensors (global adapter + head), and for other tools merged.safetensors (a plain timm
state dict, adapters merged) and adapter/ (HF PEFT's format).

Every input is checked before anything expensive happens or anything is written: arguments, then
--out (read only), the data (split files, labels, a directory listing that every image exists),
then the backbone weights (a --checkpoint is read and fitted to the model built on the meta
device; hub weights are looked up in the local cache). Only then is the model built, pretrained
weights downloaded, and --out written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time

import torch

import exchange
from aggregators import AGGREGATORS
from backbone import SHAPES_MODELS, ModelError, build_model, check_weights
from data import (DATASETS, SHAPES_DOMAINS, DataError, image_domains, list_images, load_shapes, make_transform,
                  partition, shapes_task_classes, write_splits)
from exchange import PeerFailed, agree
from dp import ACCOUNTANT, DPConfig, Privacy
from fed import Client, Diverged, FedConfig, Federation, plan_privacy, rounds_taken
from lora import merged_state, peft_adapter

DATASET_DEFAULTS = {
    # paper (Setup): ViT-B/16 in21k, rank 16, lr 0.01, batch 128; derived code: alpha max(8, 2r), dropout 0.1
    "domainnet": dict(model="vit_base_patch16_224.augreg_in21k", num_classes=100, rounds=30, batch_size=128,
                      lr=0.01, local_epochs=1, eval_every=1, n_train=None, n_test=None),
    "nicopp": dict(model="vit_base_patch16_224.augreg_in21k", num_classes=60, rounds=30, batch_size=128,
                   lr=0.01, local_epochs=1, eval_every=1, n_train=None, n_test=None),
    # embedded: a 4-block ViT on 32x32 glyphs; clients drift (several local steps on distinct styles)
    "shapes": dict(model="vit_shapes", num_classes=10, rounds=20, batch_size=32, lr=0.05, local_epochs=1,
                   eval_every=2, n_train=320, n_test=200),
}
# keys of config.json that must match for --resume (the rest may change: rounds, device, workers, out)
RESUME_FREE = {"rounds", "resume", "out", "device", "workers", "progress", "eval_every", "dist_timeout",
               "deterministic"}
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.safetensors", "final.safetensors", "merged.safetensors")


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


class Stopped(Exception):
    """A run that stopped before its last round (diverged: exit code 3; interrupted: 130), with the
    one line that says what was kept and how to go on."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.code = code


class Help(argparse.HelpFormatter):
    """--help with each option's default: its own, or the dataset's (DATASET_DEFAULTS)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None and any(action.dest in d for d in DATASET_DEFAULTS.values()):
            per = {name: d[action.dest] for name, d in DATASET_DEFAULTS.items() if d.get(action.dest) is not None}
            said = {str(v) for v in per.values()}
            return text + (f" (default: {said.pop()})" if len(said) == 1 and len(per) == len(DATASET_DEFAULTS) else
                           " (default: " + ", ".join(f"{v} on {name}" for name, v in per.items()) + ")")
        if action.default is None or action.default is False:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, with the closest choice or flag to a mistyped one."""

    def _check_value(self, action, value):
        import difflib
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices or ()], 1)
            raise argparse.ArgumentError(action, f"{e.message}; did you mean {close[0]!r}?" if close else e.message)

    def error(self, message):
        import difflib
        if message.startswith("unrecognized arguments: "):
            hints = [f"{a} (did you mean {c[0]}?)" for a in message.split(": ", 1)[1].split()
                     if a.startswith("--") and (c := difflib.get_close_matches(a.split("=")[0], self._option_string_actions, 1))]
            message += "; " + ", ".join(hints) if hints else ""
        self.exit(2, f"error: {message} (all options: python train.py --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(description="Federated LoRA fine-tuning (LoRA-FAIR and baselines)", formatter_class=Help)
    p.add_argument("--method", default="lorafair", choices=list(AGGREGATORS), help="aggregation method")
    p.add_argument("--dataset", default="shapes", choices=list(DATASET_DEFAULTS),
                   help="shapes: embedded, generated offline (default)")
    p.add_argument("--data-root", default=None,
                   help="DomainNet: the folder holding <domain>/ and <domain>_{train,test}.txt; NICO++: the folder "
                        "it was extracted into (docs/data.md)")
    p.add_argument("--splits", default=None, help="folder of <domain>_{train,test}.txt split files to use instead "
                                                  "of those found under --data-root")
    p.add_argument("--split-seed", type=int, default=0,
                   help="NICO++ without split files: seed of the train/test split made here (fixed across run seeds)")
    p.add_argument("--domains", default=None, help="comma-separated subset of the dataset's domains")
    p.add_argument("--num-classes", type=int, default=None, help="DomainNet: the first N classes (345: all)")
    p.add_argument("--clients-per-domain", type=int, default=1, help="1 = feature non-IID (Table 1)")
    p.add_argument("--dirichlet", type=float, default=0.5, help="label skew within a domain when >1 client each")
    p.add_argument("--n-train", type=int, default=None, help="shapes: training images per domain")
    p.add_argument("--n-test", type=int, default=None, help="shapes: test images per domain")
    p.add_argument("--norm", default="model", choices=["model", "clip"], help="normalisation statistics")
    p.add_argument("--model", default=None, help="timm ViT or MLP-Mixer name")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="start from pretrained weights")
    p.add_argument("--checkpoint", default=None,
                   help="local backbone weights: .safetensors, .pth/.bin/.pth.tar (timm training checkpoints too), "
                        "Google's ViT .npz, or a folder holding model.safetensors")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default max(8, 2 r), per client with --ranks)")
    p.add_argument("--ranks", default=None,
                   help="heterogeneous ranks: a list cycled over the clients (or domains, --rank-by), e.g. 4,8,16 "
                        "(the global adapter's rank is their maximum; overrides --rank)")
    p.add_argument("--rank-by", default="client", choices=["client", "domain"],
                   help="--ranks entry i goes to client i, or to every client of domain i (domains in dataset order)")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on each LoRA layer's input")
    p.add_argument("--lora-targets", default=None, help="comma-separated module names, e.g. attn.qkv,attn.proj")
    p.add_argument("--rounds", type=int, default=None, help="communication rounds (with --resume: the run's own unless given)")
    p.add_argument("--local-epochs", type=int, default=None, help="local epochs a client a round")
    p.add_argument("--local-steps", type=int, default=None, help="cap on local steps per round")
    p.add_argument("--client-init", default="global", choices=["global", "fresh", "local"],
                   help="clients start a round from the global adapter (paper), a fresh LoRA, or their own last one")
    p.add_argument("--local-head", action="store_true",
                   help="fedsa: every client keeps its own classifier head too (evaluated per client, like its B)")
    p.add_argument("--centralised", action="store_true",
                   help="reference run: one client holding every domain's training data")
    p.add_argument("--participation", type=float, default=1.0, help="fraction of clients per round")
    p.add_argument("--lr", type=float, default=None, help="client SGD learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="client batch size")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N rounds (and after the last)")
    p.add_argument("--fair-solver", default="fixed-point", choices=["fixed-point", "sgd"],
                   help="LoRA-FAIR's server step: Eq. 8 solved to convergence, or the published plain SGD (docs/lorafair.md)")
    p.add_argument("--fair-steps", type=int, default=None,
                   help="fixed-point iterations (20), or SGD steps (1000, the paper's)")
    p.add_argument("--fair-lr", type=float, default=None, help="SGD's step size (0.01, the paper's)")
    p.add_argument("--fair-lam", type=float, default=0.01, help="Eq. 8's lambda")
    p.add_argument("--fair-init", default="zeros", choices=["zeros", "xavier"], help="SGD's starting dB")
    p.add_argument("--fair-similarity", default="flat", choices=["flat", "column"], help="SGD's cosine: of the flattened matrices or per column")
    p.add_argument("--fair-correct", default="B", choices=["B", "A", "both"], help="which factor gets a residual")
    p.add_argument("--fair-objective", default="cosine", choices=["cosine", "lsq"],
                   help="Eq. 8's cosine objective, or its closed-form ridge least-squares cousin (docs/lorafair.md)")
    p.add_argument("--hetlora-use-p", action="store_true",
                   help="hetlora: weight clients by p_k ||B_k A_k|| instead of ||B_k A_k|| alone")
    p.add_argument("--florist-tau", type=float, default=0.9, help="florist: share of sum sigma^2 the kept components reach")
    p.add_argument("--spectral-strategy", default="i", choices=["i", "w", "0"],
                   help="spectral: ScreeNOT's noise estimate (imputation, winsorization, transport to zero)")
    p.add_argument("--spectral-k", type=int, default=None,
                   help="spectral: ScreeNOT's upper bound on the signal rank (default: a quarter of the stacked rank)")
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="DP-SGD on every client: its records (epsilon, delta)-DP over the whole run (dp.py)")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="DP's delta (with --dp-epsilon)")
    p.add_argument("--dp-clip", type=float, default=2.0, help="DP-SGD's bound C on one record's gradient norm")
    p.add_argument("--dp-secret-noise", action="store_true",
                   help="draw DP's noise and batches from the OS's entropy, not --seed (as a deployment must; "
                        "not repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast, on the CPU too (default: on where the GPU has native bf16, compute capability "
                        ">= 8.0); it changes the arithmetic, so a resumed run must keep it")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: 8 on GPU for image files, else 0)")
    p.add_argument("--deterministic", action="store_true",
                   help="GPU: deterministic kernels only (torch.use_deterministic_algorithms), so that the same "
                        "seed gives the same result; CPU runs are repeatable without it")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw of the run")
    p.add_argument("--out", default="runs/latest", help="the run's folder (README: what a run leaves)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: only when stderr is a terminal, so a log file gets none)")
    p.add_argument("--dist-timeout", type=float, default=600,
                   help="torchrun: seconds a process waits for the others before ending with an error")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill per-dataset defaults and validate; raise UserError on bad values."""
    for k, v in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, k, None) is None and not (k == "rounds" and args.resume):   # resumed: the run's own
            setattr(args, k, v)
    args.client_alphas = None
    if args.ranks:
        try:
            ranks = [int(x) for x in args.ranks.split(",")]
        except ValueError:
            raise UserError(f"--ranks must be comma-separated integers such as 4,8,16, got {args.ranks!r}")
        if min(ranks) < 1:
            raise UserError(f"--ranks must all be >= 1, got {args.ranks}")
        # the global rank R is the largest rank a client gets: entries past the clients (or domains) are unused
        n_domains = len(args.domains.split(",")) if args.domains else len(
            SHAPES_DOMAINS if args.dataset == "shapes" else DATASETS[args.dataset][0])
        takers = n_domains * (1 if args.rank_by == "domain" else args.clients_per_domain)
        args.rank = max(ranks[j % len(ranks)] for j in range(takers))
        if takers < len(ranks):
            print(f"note: --ranks {args.ranks}: only the first {takers} entries go to a {args.rank_by}; "
                  f"the global rank R is {args.rank}", file=sys.stderr)
        args.client_alphas = [args.alpha if args.alpha is not None else float(max(8, 2 * r)) for r in ranks]
    args.alpha = args.alpha if args.alpha is not None else float(max(8, 2 * args.rank))
    if args.rank <= 0:
        raise UserError(f"--rank must be > 0, got {args.rank}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.participation <= 1:
        raise UserError(f"--participation must be in (0, 1], got {args.participation}")
    if (args.rounds is not None and args.rounds < 1) or args.batch_size <= 0 or args.eval_every <= 0:
        raise UserError("--rounds, --batch-size and --eval-every must be > 0")
    if args.local_epochs <= 0 and not args.local_steps:
        raise UserError("--local-epochs must be > 0 unless --local-steps is given")
    check_dp(args)
    check_unused_fair_options(args)
    check_method_options(args)
    check_combination(args)
    if args.local_head and args.method != "fedsa":
        raise UserError(f"--local-head applies to --method fedsa (its clients keep their own B), not {args.method}")
    if args.dataset != "shapes" and not args.data_root:
        raise UserError(f"--dataset {args.dataset} needs --data-root (docs/data.md: what to download and where)")
    if args.model not in SHAPES_MODELS:
        import timm
        if not timm.is_model(args.model):
            raise UserError(f"unknown model {args.model!r}; pass a timm ViT or MLP-Mixer name "
                            "(e.g. vit_base_patch16_224.augreg_in21k, mixer_b16_224.goog_in21k)")
    cuda = torch.cuda.is_available()
    args.device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    if args.device.startswith("cuda") and not cuda:
        raise UserError(f"--device {args.device} but CUDA is not available; use --device cpu")
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    args.amp = bf16_native(args.device) and args.dp_epsilon is None if args.amp is None else args.amp
    if args.workers is None:   # decoding files in parallel pays; in-memory tensors (shapes) need no workers
        args.workers = 8 if args.device.startswith("cuda") and args.dataset != "shapes" else 0
    return args


def bf16_native(device: str) -> bool:
    """Whether bf16 runs in hardware on `device`: CUDA compute capability 8.0 (Ampere) or later.
    Older GPUs emulate it, slower than float32, so --amp is off there unless asked for."""
    return device.startswith("cuda") and torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)


OPTION_FLAGS = {   # method -> {aggregator option: train.py argument}
    "lorafair": {"solver": "fair_solver", "steps": "fair_steps", "lr": "fair_lr", "lam": "fair_lam",
                 "init": "fair_init", "similarity": "fair_similarity", "correct": "fair_correct", "objective": "fair_objective"},
    "hetlora": {"use_p": "hetlora_use_p"},
    "florist": {"tau": "florist_tau"},
    "spectral": {"strategy": "spectral_strategy", "k": "spectral_k"},
}


# --method x --client-init pairs that have no consistent meaning: refused before any work.
# Every other pair is defined (docs/training.md, "Option combinations"; tests/test_train.py enumerates them).
REFUSED_INIT = {
    ("flora", "local"): "flora folds each round's dW into W0, so a client that continued from its own adapter "
                        "would count its update twice",
    ("florist", "local"): "florist folds each round's truncated dW into W0, so a client that continued from its "
                          "own adapter would count its update twice",
    ("fedex", "local"): "fedex folds dW - B_bar A_bar into W0 for clients that restart from (A_bar, B_bar); a "
                        "client that continued from its own adapter would count its update twice",
    ("rolora", "local"): "rolora trains one factor a round against a factor shared by every client; clients' own "
                         "adapters do not share it",
    ("fedsa", "local"): "fedsa already keeps each client's B and shares A; for fully local adapters use "
                        "--method fedit --client-init local",
    ("fedsa", "fresh"): "a freshly drawn A would be paired with each client's old B",
    ("rolora", "fresh"): "a fresh LoRA has B = 0, so in every phase-'A' round (only A trains) A's gradient is "
                         "exactly zero",
    ("fedsvd", "local"): "fedsvd's server re-factorises the shared A every round; clients that kept their own "
                         "adapters would never train on it",
    ("frlora", "local"): "frlora folds each round's update into W0 and restarts every client from its initial "
                         "adapter; a client that continued from its own would count its update twice",
    ("frlora", "fresh"): "frlora restarts every client from W0's top singular components; a fresh random LoRA "
                         "would replace that start",
}


def check_combination(args) -> None:
    """Refuse, in one line and before any work, option combinations with no defined meaning."""
    why = REFUSED_INIT.get((args.method, args.client_init))
    if why:
        raise UserError(f"--method {args.method} with --client-init {args.client_init}: {why}")
    defaults = get_args_parser().parse_args([])
    for method, flags in OPTION_FLAGS.items():
        for dest in flags.values():
            if method != args.method and getattr(args, dest) != getattr(defaults, dest):
                raise UserError(f"--{dest.replace('_', '-')} applies to --method {method}, not {args.method}")
    if args.centralised:
        for dest, what in (("participation", "there is one client, always taking part"),
                           ("ranks", "there is one client: give its rank with --rank"),
                           ("clients_per_domain", "one client holds every domain's data")):
            if getattr(args, dest) != getattr(defaults, dest):
                raise UserError(f"--{dest.replace('_', '-')} does not apply to --centralised: {what}")
    if args.method == "frlora" and args.ranks:
        raise UserError("--method frlora with --ranks: its adapter starts as W0's top-r singular components, shared "
                        "by every client, so one rank is defined (give it with --rank)")
    if args.rank_by != defaults.rank_by and not args.ranks:
        raise UserError("--rank-by needs --ranks (the list it assigns)")
    if args.dataset == "shapes":
        shapes_task_classes(args.num_classes)      # 2..100 classes, none of them the backbone's pretraining ones


def check_dp(args) -> None:
    """--dp-epsilon's values; --dp-delta and --dp-clip mean nothing without it."""
    defaults = get_args_parser().parse_args([])
    if args.dp_epsilon is None:
        for dest in ("dp_delta", "dp_clip", "dp_secret_noise"):
            if getattr(args, dest) != getattr(defaults, dest):
                raise UserError(f"--{dest.replace('_', '-')} applies with --dp-epsilon (DP-SGD on the clients)")
        return
    if args.amp:
        raise UserError("--amp with --dp-epsilon: per-record gradients in bf16 have norms that can pass the clip by "
                        "bf16's rounding, which the privacy bound does not allow; drop --amp (DP runs in float32)")
    if not 0 < args.dp_epsilon < math.inf or not 0 < args.dp_delta < 1 or not 0 < args.dp_clip < math.inf:
        raise UserError(f"--dp-epsilon and --dp-clip must be finite and > 0, --dp-delta in (0, 1); got {args.dp_epsilon:g}, "
                        f"{args.dp_delta:g} and {args.dp_clip:g}")


def privacy_plan(args, clients) -> Privacy | None:
    """--dp-epsilon: each client's noise, calibrated for this run's rounds; resumed from a
    checkpoint, the checkpoint's ledger, refused (before anything is written) if the rounds asked
    for would spend past the budget."""
    if args.dp_epsilon is None:
        return None
    cfg = fed_config(args)
    ckpt = os.path.join(args.out, "checkpoint.safetensors")
    n = min(c.n for c in clients)
    if args.dp_delta >= 1 / n:              # delta >= 1/n allows releasing a record outright
        raise UserError(f"--dp-delta {args.dp_delta:g} is not below 1 / n_k = {1 / n:.3g} for the smallest client "
                        f"({n} records); pass a --dp-delta well below it (1e-5 is usual)")
    try:
        if not (args.resume and os.path.isfile(ckpt)):
            return plan_privacy(clients, cfg, args.rounds)
        from safetensors import safe_open
        with safe_open(ckpt, "pt") as f:
            privacy = Privacy.from_tensors(cfg.dp, {k: f.get_tensor(k) for k in f.keys() if k.startswith("dp/")})
        privacy.check_budget(rounds_taken(len(clients), cfg, args.rounds))
        return privacy
    except ValueError as e:
        raise UserError(f"--dp-epsilon {args.dp_epsilon:g}: {e}") from None
    except ImportError as e:
        raise UserError(f"--dp-epsilon needs Opacus ({e}); pip install -r requirements.txt") from None


def check_unused_fair_options(args) -> None:
    """LoRA-FAIR's flags that the chosen objective or solver would ignore are refused: the closed
    form (--fair-objective lsq) has no solver, and the fixed-point solver solves Eq. 8 as written."""
    if args.method != "lorafair":
        return
    defaults = get_args_parser().parse_args([])
    if args.fair_objective == "lsq":
        unused, what = ("fair_solver", "fair_steps", "fair_lr", "fair_init", "fair_similarity"), \
            "--fair-objective lsq (one closed-form solve); drop it, or use --fair-objective cosine"
    elif args.fair_solver == "fixed-point":
        unused, what = ("fair_lr", "fair_init", "fair_similarity", "fair_correct"), \
            "--fair-solver fixed-point (Eq. 8 as written, solved); pass --fair-solver sgd for the published SGD"
    else:
        return
    for dest in unused:
        if getattr(args, dest) != getattr(defaults, dest):
            raise UserError(f"--{dest.replace('_', '-')} does not apply to {what}")


def method_options(args) -> dict:
    """The options train.py passes to the chosen method's aggregator (aggregators.py), besides ranks/phase."""
    return {opt: getattr(args, dest) for opt, dest in OPTION_FLAGS.get(args.method, {}).items()}


def check_method_options(args) -> None:
    """Run the method's own checks on its options now, on a 2-client toy layer, not after a round."""
    options = method_options(args)
    if not options:
        return
    A, B = torch.ones(2, 1, 3, dtype=torch.float64), torch.ones(2, 2, 1, dtype=torch.float64)
    if args.method == "spectral":                     # ScreeNOT needs a few singular values to work on
        A, B = torch.ones(2, 4, 16, dtype=torch.float64), torch.ones(2, 16, 4, dtype=torch.float64)
    try:
        AGGREGATORS[args.method](A, B, [0.5, 0.5], **options)
    except ValueError as e:
        flags = ", ".join("--" + d.replace("_", "-") for d in OPTION_FLAGS[args.method].values())
        raise UserError(f"{e} (set by {flags})") from None


def fed_config(args) -> FedConfig:
    """The federated run's settings from train.py's (resolved) arguments."""
    return FedConfig(method=args.method, lr=args.lr, batch_size=args.batch_size, local_epochs=args.local_epochs,
                     local_steps=args.local_steps, participation=args.participation, seed=args.seed, amp=args.amp,
                     workers=args.workers, progress=args.progress, client_init=args.client_init,
                     local_head=args.local_head, agg_options=method_options(args),
                     dp=DPConfig(args.dp_epsilon, args.dp_delta, args.dp_clip, args.dp_secret_noise)
                     if args.dp_epsilon else None)


def build_data(args, listing):
    """Domains and clients (labels and partition only: image transforms are set once the model is known)."""
    domains = args.domains.split(",") if args.domains else None
    if args.dataset == "shapes":
        doms = load_shapes(domains, args.n_train, args.n_test, num_classes=args.num_classes)
    else:
        doms = image_domains(listing)
    if args.centralised:
        return doms, [Client(-1, list(range(sum(len(d.train) for d in doms))))]
    parts = partition(doms, args.clients_per_domain, args.dirichlet, seed=args.seed)
    clients = [Client(d, idx) for d, idx in parts]
    if args.ranks:   # client i (or each client of domain i): rank and scaling alpha / r of the entry i mod n
        ranks = [int(x) for x in args.ranks.split(",")]
        for i, c in enumerate(clients):
            j = (c.domain if args.rank_by == "domain" else i) % len(ranks)
            c.rank, c.scale = ranks[j], args.client_alphas[j] / ranks[j]
    return doms, clients


# ----------------------------------------------------------------------------- run

def config_of(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items())}


def free_keys(method: str) -> set[str]:
    """Settings that do not change a run of `method`: RESUME_FREE and the other methods' options."""
    return RESUME_FREE | {dest for m, flags in OPTION_FLAGS.items() if m != method for dest in flags.values()}


def effective(config: dict) -> dict:
    """A config with LoRA-FAIR's solver settings as they acted: a config.json written before
    --fair-solver existed ran the SGD, and the SGD's unset steps and lr are its 1000 and 0.01."""
    config = dict(config)
    if config.get("method") == "lorafair" and config.get("fair_objective", "cosine") == "cosine":
        config.setdefault("fair_solver", "sgd")
        if config["fair_solver"] == "sgd":
            config["fair_steps"] = 1000 if config.get("fair_steps") is None else config["fair_steps"]
            config["fair_lr"] = 0.01 if config.get("fair_lr") is None else config["fair_lr"]
    return config


def config_diff(old: dict, args) -> str:
    """The settings (outside free_keys) in which a run's config.json and these arguments differ,
    as 'key: old vs new, ...' (empty: the same run)."""
    old, new, defaults = effective(old), effective(config_of(args)), vars(get_args_parser().parse_args([]))
    free = free_keys(args.method)
    diff = sorted(k for k in set(old) | set(new) if k not in free and old.get(k, defaults.get(k)) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in diff[:4])


UMASK = os.umask(0o022)   # read once (os.umask sets as it reads), then restored
os.umask(UMASK)


def save_tensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors file written atomically (a .tmp renamed), readable as the umask allows (the
    library itself creates files only their owner can read)."""
    from safetensors.torch import save_file
    save_file(tensors, path + ".tmp", metadata=metadata)
    os.chmod(path + ".tmp", 0o666 & ~UMASK)
    os.replace(path + ".tmp", path)


def save_checkpoint(fed: Federation, out: str) -> None:
    save_tensors(fed.state_tensors(), os.path.join(out, "checkpoint.safetensors"), {"round": str(fed.round)})


def checkpoint_round(path: str) -> int:
    """The rounds a checkpoint.safetensors holds (0 if there is none)."""
    if not os.path.isfile(path):
        return 0
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return int(f.metadata()["round"])


def check_out(args) -> bool:
    """Check --out without touching it; return whether a checkpoint is there to resume from. A
    resumed run without --rounds finishes the rounds it was started with; fewer rounds than its
    checkpoint holds are refused."""
    out = args.out
    cfg_path, ckpt = os.path.join(out, "config.json"), os.path.join(out, "checkpoint.safetensors")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; pass a folder for the run's outputs")
    if not args.resume:
        if os.path.exists(cfg_path):
            raise UserError(f"{out} already holds a run; pass --resume to continue it or a new --out")
        others = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
        if others:
            raise UserError(f"{out} holds {', '.join(others)} but no config.json; pass a new --out")
        return False
    if not os.path.isdir(out):
        raise UserError(f"--resume: {out} does not exist; start the run without --resume")
    if not os.path.isfile(cfg_path):
        raise UserError(f"--resume: {out} has no config.json, so no run of train.py was started there")
    try:
        with open(cfg_path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {cfg_path} cannot be read ({type(e).__name__}); it is not this program's config")
    diff = config_diff(old, args)
    if diff:
        raise UserError(f"--resume: {out} was run with a different configuration ({diff})")
    done = checkpoint_round(ckpt)  # no checkpoint: stopped during round 1, so it starts again from round 0
    if args.rounds is None:
        args.rounds = old["rounds"]
    elif args.rounds < done:
        raise UserError(f"--resume --rounds {args.rounds}: {out} has already run {done} rounds; pass --rounds "
                        f">= {done}, or leave --rounds out to finish the {old['rounds']} it was started with")
    return os.path.isfile(ckpt)


def write_out(args, listing) -> list[str]:
    """The run's first files, once every check has passed: config.json and a split made here.
    Returns what a new run created (the folder, or the files in it), for `stopped` to remove."""
    made_splits = listing is not None and listing.split_dir is None and not args.resume
    names = [*RUN_FILES, "checkpoint.safetensors.tmp", "adapter", *(["splits"] if made_splits else [])]
    created = [] if args.resume else [args.out] if not os.path.exists(args.out) else \
        [p for n in names if not os.path.exists(p := os.path.join(args.out, n))]
    os.makedirs(args.out, exist_ok=True)
    if made_splits:
        write_splits(listing, os.path.join(args.out, "splits"))
    path = os.path.join(args.out, "config.json")   # resumed: only RESUME_FREE entries (e.g. rounds) change
    with open(path + ".tmp", "w") as f:
        json.dump(config_of(args), f, indent=1)
    os.replace(path + ".tmp", path)
    return created


class Terminated(Exception):
    """SIGTERM (a scheduler's or `kill`'s stop): ends the run like Ctrl-C, exit code 143."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    import signal
    import threading
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    rank, world, created = 0, 1, False
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        args = resolve(args)
        if args.deterministic:   # cuBLAS reads its workspace setting when first used: set it before any work
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        rank, world, created, args.device = exchange.setup(args.device, args.dist_timeout)
        return run(args, rank, world, argv)
    except (UserError, DataError, ModelError, PeerFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:           # before --out was written (after it: Stopped)
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except RuntimeError as e:   # a rank died or timed out: end here too, never hang
        lost = isinstance(e, torch.distributed.DistError) or any(w in str(e) for w in ("gloo", "NCCL", "peer"))
        if world == 1 or not lost:
            raise
        print(f"error: rank {rank} of {world}: lost the other processes ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); the last checkpoint in {args.out} is intact, "
              "continue with --resume", file=sys.stderr)
        return 1
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if created:
            torch.distributed.destroy_process_group()


def run(args, rank: int = 0, world: int = 1, argv: list[str] = ()) -> int:
    """A run, step by step (rank 0 alone prints and writes files)."""
    lead = rank == 0
    args.progress = (sys.stderr.isatty() if args.progress is None else args.progress) and lead
    listing, domains, clients, model, resume, privacy = prepare(args, rank, world)   # 1. every check, the model
    created = open_out(args, rank, world, listing)                          # 2. --out: config.json (nothing before)
    try:
        fed = Federation(model, domains, clients, fed_config(args), torch.device(args.device), rank, world, privacy)
        done = restore(args, fed, resume, listing)                          # 3. --resume: the checkpoint's rounds
        acc = train_rounds(args, fed, done)                                 # 4. the rounds: metrics, checkpoints
        conclude(args, fed, acc)                                            # 5. last evaluation, report, exports
        return 0
    except (Diverged, KeyboardInterrupt, Terminated) as e:
        code = 3 if isinstance(e, Diverged) else 143 if isinstance(e, Terminated) else 130
        raise Stopped(stopped(args, argv, e, created if lead else []), code) from None
    except BaseException as e:       # anything else (out of memory, a bug): the same cleanup, then the traceback
        if lead:
            print(f"error: {type(e).__name__}; " + stopped(args, argv, e, created), file=sys.stderr)
        raise


def prepare(args, rank: int, world: int):
    """Every check (cheap, nothing written: --out, the data's listing, DP's budget, the weights),
    then the data and the model on its device. Returns (listing, domains, clients, model, whether
    --out holds a checkpoint to resume, DP's ledger or None); on torchrun every rank agrees with
    rank 0 or stops with it."""
    lead = rank == 0
    listing = error = resume = domains = clients = model = model_cfg = privacy = None
    try:
        resume = check_out(args) if lead else None
        if args.dataset != "shapes":
            splits = args.splits
            made = os.path.join(args.out, "splits")       # a split made here by the run being resumed
            if args.resume and not splits and os.path.isdir(made):
                splits = made
            listing = list_images(args.dataset, args.data_root, args.domains.split(",") if args.domains else None,
                                  args.num_classes, splits, args.split_seed)
        domains, clients = build_data(args, listing)
        privacy = privacy_plan(args, clients) if lead else None   # DP-SGD's noise (resumed: within budget?)
        weights = check_weights(args)
        if lead and listing is not None:
            print(listing.summary(), file=sys.stderr)
        torch.manual_seed(args.seed)
        model, model_cfg = build_model(args, weights)
    except (UserError, DataError, ModelError) as e:
        error = e
    resume, args.rounds = agree(world, rank, error, (bool(resume), args.rounds or 0), args.device)
    if args.dp_epsilon and world > 1:                        # rank 0's ledger on every process
        zeros = Privacy(fed_config(args).dp, *[[0] * len(clients)] * 4)
        privacy = Privacy.from_tensors(zeros.cfg, exchange.from_lead((privacy or zeros).tensors(), world))
    for d in domains if listing is not None else ():
        d.train.transform = d.test.transform = make_transform(model_cfg, args.norm)
    model.to(torch.device(args.device))
    return listing, domains, clients, model, resume, privacy


def open_out(args, rank: int, world: int, listing) -> list[str]:
    """Rank 0 writes --out's first files; returns the paths it created (removed again if the run
    stops before its first checkpoint)."""
    error, created = None, []
    if rank == 0:
        try:
            created = write_out(args, listing)
        except OSError as e:
            error = UserError(f"cannot write to --out {args.out}: {e}")
    agree(world, rank, error, device=args.device)
    return created


def stopped(args, argv: list[str], e: BaseException, created: list[str]) -> str:
    """What a run that stopped early says. A new run with no round saved removes what it wrote
    (`created`), so the corrected command simply works; otherwise the checkpoint stays, and the
    line gives the commands that continue it or start again elsewhere."""
    what = {KeyboardInterrupt: "interrupted", Terminated: "terminated (SIGTERM)"}.get(type(e), str(e))
    done = checkpoint_round(os.path.join(args.out, "checkpoint.safetensors"))
    if not done and created:
        for path in filter(os.path.exists, created):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        gone = f"{args.out} was removed again" if args.out in created else f"what it wrote in {args.out} was removed"
        return f"{what}; no round was saved, so {gone}"
    plain = [a for a in argv if a != "--resume"]
    again = shlex.join(["python", "train.py", *plain, "--resume"])
    if isinstance(e, Diverged):      # continuing would diverge again: start over, lr / 10, beside the run
        lr = f"{args.lr / 10:g}"
        restart = shlex.join(["python", "train.py", *with_flag(with_flag(plain, "--lr", lr), "--out",
                                                                  f"{args.out.rstrip('/')}-lr{lr}")])
        return f"{what}; rounds 1-{done} are saved in {args.out}; start again at a lower lr with `{restart}`"
    if not done:
        return f"{what}; no round of it was saved; run it again with `{again}`"
    return (f"{what}; rounds 1-{done} are saved in {args.out}: continue with `{again}`, "
            f"or start again with another --out")


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag value` set: replaced where given (also as --flag=value), else appended."""
    out = [a for a in argv if not a.startswith(flag + "=")]
    if flag in out:
        out[out.index(flag) + 1] = value
        return out
    return [*out, flag, value]


def restore(args, fed: Federation, resume: bool, listing) -> int:
    """The rounds already done: with --resume, the checkpoint's state (if round 1 ever finished),
    and metrics.jsonl cut back to its rounds. Prints what the run is about to do."""
    from safetensors import safe_open
    lead, done = fed.rank == 0, 0
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if lead and listing is not None and listing.split_dir is None and not args.resume:
        print(f"{args.dataset}: no split files found, so each (domain, class) was split train/test here "
              f"(seed {args.split_seed}); written to {args.out}/splits, reuse with --splits {args.out}/splits",
              file=sys.stderr)
    if args.resume:
        if resume:
            with safe_open(os.path.join(args.out, "checkpoint.safetensors"), "pt") as f:
                done = int(f.metadata()["round"])
                fed.load_state_tensors({k: f.get_tensor(k).to(fed.device) for k in f.keys()}, done)
        if lead and os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                keep = [line for line in f if json.loads(line)["round"] <= done]
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(metrics_path + ".tmp", metrics_path)
        if lead:
            print(f"resuming {args.out} after round {done}" + ("" if resume else " (it stopped before its first "
                  "checkpoint)"), file=sys.stderr)
    if lead:
        print(f"{args.method} on {args.dataset}: {len(fed.clients)} clients over {len(fed.domains)} domains, model "
              f"{args.model}, " + (f"ranks {args.ranks} (global rank {args.rank})" if args.ranks else f"rank {args.rank}")
              + f", {args.rounds} rounds, {fed.world} process(es), device {fed.device}",
              file=sys.stderr)
    return done


def train_rounds(args, fed: Federation, done: int) -> dict | None:
    """Rounds done+1 .. args.rounds: each a fed.run_round, an evaluation every --eval-every rounds
    and at the last, a line of metrics.jsonl and a checkpoint. Returns the last evaluation."""
    from tqdm.auto import tqdm
    lead, acc = fed.rank == 0, None
    for _ in tqdm(range(done, args.rounds), desc=args.method, initial=done, total=args.rounds,
                  disable=not args.progress):
        rec = fed.run_round()
        tic = time.perf_counter()
        evaluated = rec["round"] % args.eval_every == 0 or rec["round"] == args.rounds
        if evaluated:
            acc = fed.evaluate()                 # every process: the evaluations are shared out
        if not lead:
            continue                             # to the next round's first collective: rank 0 only writes files
        if evaluated:
            rec["acc"] = acc
            tqdm.write(f"round {rec['round']:3d} | loss {rec['train_loss']:.3f} | cos(dW, applied) "
                       f"{rec['cos']:.4f} | mean acc {100 * acc['mean']:.2f}%", file=sys.stderr)
        rec["seconds"]["eval"] = time.perf_counter() - tic
        rec["unreadable"] = fed.unreadable()
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        save_checkpoint(fed, args.out)
    return acc


def conclude(args, fed: Federation, acc: dict | None) -> None:
    """After the last round: the evaluation if none was made (e.g. resumed after the last round),
    then rank 0's report and files (`finish`); every process returns once rank 0 has finished."""
    error = None
    try:
        acc = acc or fed.evaluate()              # every process again
    except DataError as e:
        error = e
    if fed.rank == 0 and error is None:
        try:
            finish(args, fed, acc)
        except (UserError, DataError, ModelError) as e:
            error = e
    agree(fed.world, fed.rank, error, device=args.device)
    exchange.finish(fed.world)


def export(args, fed: Federation) -> None:
    """The final global model for other tools: <out>/merged.safetensors (timm's own state dict,
    adapters merged, folds included, head included) and <out>/adapter/ (HF PEFT's format)."""
    merged = {k: v.detach().cpu().contiguous() for k, v in merged_state(fed.model).items()}
    holds = "the global model" + (": shared A, the clients' B averaged" if args.method == "fedsa" else "")
    save_tensors(merged, os.path.join(args.out, "merged.safetensors"), {"model": args.model, "holds": holds})
    config, tensors = peft_adapter(fed.model, args.checkpoint or args.model)   # the base weights it goes on
    folder = os.path.join(args.out, "adapter")
    os.makedirs(folder, exist_ok=True)
    save_tensors({k: v.cpu() for k, v in tensors.items()}, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    notes, says = [], []                 # adapter/NOTE.txt: what the adapter alone does not carry
    if fed.folds:   # the backbone itself was changed: the adapter alone does not hold the trained model
        notes.append(f"This run ({args.method}, --client-init {args.client_init}) folded updates into the backbone "
                     "weights, which a PEFT adapter cannot carry: loaded on the original backbone, this adapter "
                     "leaves them out. The trained model is ../merged.safetensors.")
        says.append(f"{args.method} changed the backbone weights; use {args.out}/merged.safetensors, not the "
                    "adapter alone")
    if args.method == "fedsa":   # personalised: the printed accuracy is not the exported model's
        own = "B and head" if args.local_head else "B"
        notes.append(f"FedSA-LoRA keeps each client's own {own}. The accuracy this run printed scores every client "
                     f"with its own {own} (averaged per domain). ../merged.safetensors and this adapter hold the "
                     "global model instead: the shared A with the clients' B averaged (the head averaged too). "
                     "Each client's own tensors are in ../final.safetensors under client<k>/.")
        says.append(f"fedsa's printed accuracy is each client's own {own}; {args.out}/merged.safetensors and "
                    "adapter/ hold the global model (B averaged): adapter/NOTE.txt")
    if not args.pretrained and not args.checkpoint:
        notes.append("The backbone's weights were drawn at random (--no-pretrained), so no base model it could be "
                     "loaded on can be rebuilt; the trained model is ../merged.safetensors.")
    note = os.path.join(folder, "NOTE.txt")
    if notes:
        with open(note, "w") as f:
            f.write("\n\n".join(notes) + "\n")
    elif os.path.exists(note):
        os.remove(note)
    for line in says:
        print(f"note: {line}", file=sys.stderr)


def finish(args, fed: Federation, acc: dict) -> None:
    """Rank 0, after the last round: report, final.safetensors, exports."""
    if fed.unreadable():
        print("warning: images that could not be decoded were left out of training and evaluation: " + ", ".join(
            f"{d} {n['train']} train / {n['test']} test" for d, n in fed.unreadable().items()), file=sys.stderr)
    final = {k: v for k, v in fed.state_tensors().items() if k.startswith(("global/", "base/", "client"))}
    save_tensors(final, os.path.join(args.out, "final.safetensors"), {"method": args.method})
    export(args, fed)
    print(f"\n{'domain':<12s} top-1 (%)")
    for name, a in acc.items():
        print(f"{name:<12s} {100 * a:6.2f}")
    if fed.privacy:
        print(privacy_summary(fed.privacy))
    print(f"outputs in {args.out}/: config.json, metrics.jsonl, final.safetensors, merged.safetensors (the model, "
          "adapters merged), adapter/ (PEFT); how to load them: README, 'What a run leaves'", file=sys.stderr)


def privacy_summary(privacy: Privacy) -> str:
    """What a DP run spent, as the DP literature reports it."""
    p, span = privacy, lambda xs, f: f"{min(xs):{f}}" + ("" if min(xs) == max(xs) else f"..{max(xs):{f}}")  # noqa: E731
    eps = [p.epsilon(k) for k in range(len(p.sigma))]
    return (f"privacy: each client's records (epsilon, delta)-DP, record-level DP-SGD, {ACCOUNTANT.upper()} accountant: "
            f"epsilon spent {span(eps, '.3f')} of {p.cfg.epsilon:g}, delta {p.cfg.delta:g}, noise multiplier "
            f"{span(p.sigma, '.4f')}, clip {p.cfg.clip:g}, sample rate {span(p.rate, '.4f')}, steps {span(p.steps, 'd')}; "
            + ("noise from the OS's entropy" if p.cfg.secret else "noise drawn from --seed (private only to whom "
               "the seed is secret; --dp-secret-noise for a deployment)"))


if __name__ == "__main__":
    sys.exit(main())
