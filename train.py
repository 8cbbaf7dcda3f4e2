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
import hashlib
import json
import math
import os
import socket
import sys
import time
from urllib.parse import urlparse

import torch

from aggregators import AGGREGATORS
from data import (DATASETS, DataError, image_domains, list_images, load_shapes, make_transform, partition,
                  shapes_split, write_splits)
from fed import Client, FedConfig, Federation
from lora import inject_lora, merged_state, peft_adapter

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
LORA_TARGETS = {"vit": ["attn.proj", "mlp.fc2"], "mixer": ["mlp_tokens.fc2", "mlp_channels.fc2"]}
CACHE = os.environ.get("LORAFAIR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lorafair"))
# keys of config.json that must match for --resume (the rest may change: rounds, device, workers, out)
RESUME_FREE = {"rounds", "resume", "out", "device", "workers", "progress", "eval_every", "dist_timeout"}
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.safetensors", "final.safetensors", "merged.safetensors")


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Federated LoRA fine-tuning (LoRA-FAIR and baselines)")
    p.add_argument("--method", default="lorafair", choices=list(AGGREGATORS))
    p.add_argument("--dataset", default="shapes", choices=list(DATASET_DEFAULTS),
                   help="shapes: embedded, generated offline (default)")
    p.add_argument("--data-root", default=None,
                   help="DomainNet: the folder holding <domain>/ and <domain>_{train,test}.txt; NICO++: the folder "
                        "it was extracted into (README, Data)")
    p.add_argument("--splits", default=None, help="folder of <domain>_{train,test}.txt split files to use instead "
                                                  "of those found under --data-root")
    p.add_argument("--split-seed", type=int, default=0,
                   help="NICO++ without split files: seed of the train/test split made here (fixed across run seeds)")
    p.add_argument("--domains", default=None, help="comma-separated subset of the dataset's domains")
    p.add_argument("--num-classes", type=int, default=None, help="DomainNet: first N classes (100; 345 = all)")
    p.add_argument("--clients-per-domain", type=int, default=1, help="1 = feature non-IID (Table 1)")
    p.add_argument("--dirichlet", type=float, default=0.5, help="label skew within a domain when >1 client each")
    p.add_argument("--n-train", type=int, default=None, help="shapes: training images per domain (320)")
    p.add_argument("--n-test", type=int, default=None, help="shapes: test images per domain (200)")
    p.add_argument("--norm", default="model", choices=["model", "clip"], help="normalisation statistics")
    p.add_argument("--model", default=None, help="timm ViT or MLP-Mixer name (default per dataset)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--checkpoint", default=None,
                   help="local backbone weights: .safetensors, .pth/.bin/.pth.tar (timm training checkpoints too), "
                        "Google's ViT .npz, or a folder holding model.safetensors")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default max(8, 2 r))")
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names, e.g. attn.qkv,attn.proj")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--local-steps", type=int, default=None, help="cap on local steps per round")
    p.add_argument("--client-init", default="global", choices=["global", "fresh", "local"],
                   help="clients start a round from the global adapter (paper), a fresh LoRA, or their own last one")
    p.add_argument("--local-head", action="store_true",
                   help="fedsa: every client keeps its own classifier head too (evaluated per client, like its B)")
    p.add_argument("--centralised", action="store_true",
                   help="reference run: one client holding every domain's training data")
    p.add_argument("--participation", type=float, default=1.0, help="fraction of clients per round")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--fair-steps", type=int, default=1000, help="LoRA-FAIR server SGD steps")
    p.add_argument("--fair-lr", type=float, default=0.01)
    p.add_argument("--fair-lam", type=float, default=0.01)
    p.add_argument("--fair-init", default="zeros", choices=["zeros", "xavier"])
    p.add_argument("--fair-similarity", default="flat", choices=["flat", "column"])
    p.add_argument("--fair-correct", default="B", choices=["B", "A", "both"], help="which factor gets a residual")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (GPU default)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (0 on CPU, 8 on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/latest")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dist-timeout", type=float, default=600,
                   help="torchrun: seconds a process waits for the others before ending with an error")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill per-dataset defaults and validate; raise UserError on bad values."""
    for k, v in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.alpha = args.alpha if args.alpha is not None else float(max(8, 2 * args.rank))
    if args.rank <= 0:
        raise UserError(f"--rank must be > 0, got {args.rank}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.participation <= 1:
        raise UserError(f"--participation must be in (0, 1], got {args.participation}")
    if args.rounds < 0 or args.batch_size <= 0 or args.eval_every <= 0:
        raise UserError("--rounds must be >= 0, --batch-size and --eval-every > 0")
    if args.local_epochs <= 0 and not args.local_steps:
        raise UserError("--local-epochs must be > 0 unless --local-steps is given")
    if args.local_head and args.method != "fedsa":
        raise UserError(f"--local-head applies to --method fedsa (its clients keep their own B), not {args.method}")
    if args.dataset != "shapes" and not args.data_root:
        raise UserError(f"--dataset {args.dataset} needs --data-root (README, Data: what to download and where)")
    if args.model != "vit_shapes":
        import timm
        if not timm.is_model(args.model):
            raise UserError(f"unknown model {args.model!r}; pass a timm ViT or MLP-Mixer name "
                            "(e.g. vit_base_patch16_224.augreg_in21k, mixer_b16_224.goog_in21k)")
    cuda = torch.cuda.is_available()
    args.device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    if args.device.startswith("cuda") and not cuda:
        raise UserError(f"--device {args.device} but CUDA is not available; use --device cpu")
    args.amp = args.device.startswith("cuda") if args.amp is None else args.amp
    args.workers = (8 if args.device.startswith("cuda") else 0) if args.workers is None else args.workers
    return args


# ----------------------------------------------------------------------------- models

def shapes_vit(num_classes: int):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=num_classes)


def pretrained_shapes_backbone(epochs: int = 12, per_domain: int = 2000, progress: bool = True,
                               cache: str = CACHE) -> str:
    """Train the embedded ViT on classes 10..39 of the shapes generator (disjoint from the task's
    0..9), once, and cache it outside the repo. Returns the cached file."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from data import PRETRAIN_CLASSES
    tag = hashlib.sha1(f"shapes-vit-v1-{epochs}-{per_domain}".encode()).hexdigest()[:10]
    path = os.path.join(cache, f"shapes_vit_{tag}.safetensors")
    if os.path.isfile(path):
        return path
    print(f"pretraining the embedded ViT backbone once (cached in {path}) ...", file=sys.stderr)
    torch.manual_seed(0)
    xs, ys = zip(*(shapes_split(d, per_domain, PRETRAIN_CLASSES, seed=5000 + d) for d in range(6)))
    x, y = (torch.cat(xs) - 0.5) / 0.5, torch.cat(ys)
    model = shapes_vit(PRETRAIN_CLASSES[1] - PRETRAIN_CLASSES[0])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * (len(y) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    with tqdm(total=steps, desc="pretrain", disable=not progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(len(y) // 128):
                idx = perm[i * 128:(i + 1) * 128]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    os.makedirs(cache, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    tmp = path + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, path)
    return path


def bare_model(args, device=None):
    """The backbone with a new head and no weights loaded (on `device`, e.g. 'meta': no memory)."""
    import timm
    with torch.device(device or "cpu"):
        if args.model == "vit_shapes":
            return shapes_vit(args.num_classes)
        kw = {"img_size": 32} if args.dataset == "shapes" else {}
        return timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kw)


VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
MIXER_SIZES = {512: "s", 768: "b", 1024: "l"}


def describe_weights(state: dict) -> tuple[str, str | None]:
    """What a state dict seems to be the weights of, and the --model that would take it."""
    import timm

    def name_if_known(name):
        return name if name == "vit_shapes" or timm.is_model(name) else None
    blocks = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    if any(k.startswith(("global/", "base/")) for k in state):
        return "the output of a train.py run (adapter and head), not backbone weights", None
    if "patch_embed.proj.weight" in state and "pos_embed" in state:
        D, _, p, _ = state["patch_embed.proj.weight"].shape
        prefix = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
        img = math.isqrt(state["pos_embed"].shape[1] - prefix) * p
        name = ("vit_shapes" if (D, blocks, p, img) == (96, 4, 4, 32) else
                f"vit_{VIT_SIZES.get(D, D)}_patch{p}_{img}")
        return f"a ViT of width {D}, depth {blocks}, patch {p} at {img} px", name_if_known(name)
    if "stem.proj.weight" in state and "blocks.0.mlp_tokens.fc1.weight" in state:
        D, _, p, _ = state["stem.proj.weight"].shape
        img = math.isqrt(state["blocks.0.mlp_tokens.fc1.weight"].shape[1]) * p
        return (f"an MLP-Mixer of width {D}, depth {blocks}, patch {p} at {img} px",
                name_if_known(f"mixer_{MIXER_SIZES.get(D, D)}{p}_{img}"))
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "a ResNet (LoRA here targets ViTs and MLP-Mixers)", None
    return f"no model this code knows ({len(state)} tensors, first {next(iter(state), None)!r})", None


def _misfit(path: str, args, state: dict, detail: str) -> UserError:
    desc, name = describe_weights(state)
    fix = (f"pass --model {name}" if name and name != args.model else f"pass weights of a {args.model}")
    return UserError(f"--checkpoint {path} does not fit {args.model}: it looks like {desc} ({detail}); {fix}")


def read_checkpoint(path: str):
    """A local weights file read by timm's own loader (`state_dict`/`model`/EMA wrappers, `module.`
    prefixes, timm training checkpoints holding an argparse Namespace), never unpickling code.
    Returns a state dict, or the path itself for Google's ViT .npz (read later by timm)."""
    import timm.models
    if os.path.isdir(path):   # a Hugging Face style folder (e.g. a hub snapshot)
        inside = [n for n in ("model.safetensors", "pytorch_model.bin", "model.pth") if
                  os.path.isfile(os.path.join(path, n))]
        if not inside:
            files = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".pth", ".bin", ".tar", ".npz")))
            raise UserError(f"--checkpoint {path} is a folder without model.safetensors or pytorch_model.bin; "
                            f"pass the weights file itself" + (f" (it holds {', '.join(files[:5])})" if files else ""))
        path = os.path.join(path, inside[0])
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path} does not exist")
    if path.endswith(".npz"):
        return path
    try:
        state = timm.models.load_state_dict(path, use_ema=False)
    except RuntimeError as e:
        if "non-allowlisted" not in str(e):
            raise UserError(f"--checkpoint {path} could not be read ({str(e).splitlines()[0]})")
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        shown = ", ".join(([n for n in names if not n.startswith("torch.")] or names)[:2])
        raise UserError(f"--checkpoint {path} holds pickled Python objects ({len(names)} classes such as {shown}), "
                        "e.g. a whole saved model, "
                        "not weights; unpickling could run code, so it is not loaded. If you trust it, save its "
                        "state_dict() once and pass that file")
    except Exception as e:   # truncated, not a checkpoint at all, ...
        raise UserError(f"--checkpoint {path} could not be read as weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--checkpoint {path} holds no state dict of tensors")
    return state


def fit_checkpoint(model, state: dict, path: str, args) -> dict:
    """The state dict as `model` takes it: timm's filter for the model family (position-embedding
    resizing, foreign layouts), the classifier dropped when its shape differs (a new head is
    trained), and then every other tensor present with the model's shape."""
    import importlib
    module, given = importlib.import_module(type(model).__module__), state
    if hasattr(module, "checkpoint_filter_fn"):
        try:
            state = module.checkpoint_filter_fn(state, model)
        except Exception as e:
            raise _misfit(path, args, given, f"timm could not convert it: {type(e).__name__}")
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if not (k.startswith(head + ".") and k in own and v.shape != own[k].shape)}
    missing = [k for k in own if k not in state and not k.startswith(head + ".")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        k = (wrong or missing or unexpected)[0]
        detail = (f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" if wrong else
                  f"{len(missing)} tensors missing, e.g. {k}" if missing else f"{len(unexpected)} unexpected, e.g. {k}")
        raise _misfit(path, args, given, detail)
    return state


def check_npz(model, path: str, args) -> None:
    """Google's ViT .npz (read by timm's VisionTransformer.load_pretrained): width and depth must match."""
    import numpy as np
    try:
        w = np.load(path, allow_pickle=False)
        keys = set(w.files)
    except Exception as e:
        raise UserError(f"--checkpoint {path} could not be read as an .npz archive ({type(e).__name__})")
    prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in keys), None)
    if prefix is None:
        raise UserError(f"--checkpoint {path} is an .npz without ViT weights (no embedding/kernel)")
    p, _, _, D = w[f"{prefix}embedding/kernel"].shape
    depth = len({k.split("/")[1] for k in keys if k.startswith(f"{prefix}Transformer/encoderblock_")})
    if not hasattr(model, "load_pretrained") or not hasattr(model, "patch_embed"):
        raise UserError(f"--checkpoint {path} holds ViT .npz weights (width {D}, depth {depth}); {args.model} "
                        "is not a ViT: pass a ViT --model or weights as .safetensors/.pth")
    if (D, depth) != (model.embed_dim, len(model.blocks)):
        size = VIT_SIZES.get(D)
        raise UserError(f"--checkpoint {path} does not fit {args.model}: it holds ViT .npz weights of width {D}, "
                        f"depth {depth}, patch {p}" + (f"; pass e.g. --model vit_{size}_patch{p}_224" if size else ""))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (a TCP connect), so an offline machine is told
    at once instead of after a minute of download retries."""
    import huggingface_hub.constants as hf
    if hf.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True   # the proxy decides; let the download try
    url = urlparse(hf.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_pretrained(model_name: str) -> str | None:
    """The local file of timm's pretrained weights for `model_name` if the hub cache (or torch's
    download cache) already holds it: loaded from there, it needs no network."""
    import huggingface_hub
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError as e:                       # unknown tag
        raise UserError(f"--model {model_name}: {e}")
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f"timm has no pretrained weights for {model_name}; pass --checkpoint PATH or --no-pretrained")
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for name in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            found = huggingface_hub.try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return found
        return None
    found = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
    return found if os.path.isfile(found) else None


def check_weights(args):
    """Where the backbone weights come from, checked without building the model: ('file', state
    dict or .npz path, path), ('hub', None, None) to download, ('shapes', ...) or None (random)."""
    if args.checkpoint:
        loaded = read_checkpoint(args.checkpoint)
        meta = bare_model(args, "meta")
        if isinstance(loaded, str):
            check_npz(meta, loaded, args)
        else:
            fit_checkpoint(meta, loaded, args.checkpoint, args)
        return "file", loaded, args.checkpoint
    if not args.pretrained:
        return None
    if args.model == "vit_shapes":
        return "shapes", None, None
    path = cached_pretrained(args.model)
    if path:
        return "file", read_checkpoint(path), path
    if not hub_reachable():
        import huggingface_hub.constants as hf
        raise UserError(f"pretrained weights for {args.model} are not in the local cache ({hf.HF_HUB_CACHE}) and "
                        f"the hub cannot be reached (offline?): pass --checkpoint PATH (local weights) or --no-pretrained")
    return "hub", None, None


def build_model(args, weights):
    """The backbone with its weights, then LoRA injected (`weights` from check_weights)."""
    import timm
    kind, loaded, path = weights or (None, None, None)
    if kind == "hub":
        try:
            kw = {"img_size": 32} if args.dataset == "shapes" else {}
            model = timm.create_model(args.model, pretrained=True, num_classes=args.num_classes, **kw)
        except Exception as e:   # the download failed after all
            raise UserError(f"could not download pretrained weights for {args.model} ({type(e).__name__}); "
                            "pass --checkpoint PATH (local weights) or --no-pretrained")
    else:
        model = bare_model(args)
        if kind == "shapes":
            kind, path = "file", pretrained_shapes_backbone(progress=args.progress)
            loaded = read_checkpoint(path)
        if kind == "file" and isinstance(loaded, str):
            model.load_pretrained(loaded)                        # timm's reader of Google's .npz
        elif kind == "file":
            model.load_state_dict(fit_checkpoint(model, loaded, path, args), strict=False)
    cfg = ({"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3} if args.model == "vit_shapes"
           else timm.data.resolve_data_config({}, model=model))
    family = "mixer" if "mixer" in args.model else "vit"
    targets = args.lora_targets.split(",") if args.lora_targets else LORA_TARGETS[family]
    try:
        inject_lora(model, targets, r=args.rank, alpha=args.alpha, dropout=args.lora_dropout, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0])
    return model, cfg


def build_data(args, listing):
    """Domains and clients (labels and partition only: image transforms are set once the model is known)."""
    domains = args.domains.split(",") if args.domains else None
    if args.dataset == "shapes":
        doms = load_shapes(domains, args.n_train, args.n_test)
    else:
        doms = image_domains(listing)
    if args.centralised:
        return doms, [Client(-1, list(range(sum(len(d.train) for d in doms))))]
    parts = partition(doms, args.clients_per_domain, args.dirichlet, seed=args.seed)
    return doms, [Client(d, idx) for d, idx in parts]


# ----------------------------------------------------------------------------- run

def config_of(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items())}


def save_checkpoint(fed: Federation, out: str) -> None:
    from safetensors.torch import save_file
    tmp = os.path.join(out, "checkpoint.safetensors.tmp")
    save_file(fed.state_tensors(), tmp, metadata={"round": str(fed.round)})
    os.replace(tmp, os.path.join(out, "checkpoint.safetensors"))


def check_out(args) -> bool:
    """Check --out without touching it; return whether a checkpoint is there to resume from."""
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
    new, defaults = config_of(args), vars(get_args_parser().parse_args([]))
    diff = sorted(k for k in set(old) | set(new)
                  if k not in RESUME_FREE and old.get(k, defaults.get(k)) != new.get(k))
    if diff:
        raise UserError(f"--resume: {out} was run with a different configuration ("
                        + ", ".join(f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in diff[:4]) + ")")
    return os.path.isfile(ckpt)    # no checkpoint: stopped during round 1, so it starts again from round 0


def write_out(args, listing) -> None:
    """The run's first files, once every check has passed: config.json and a split made here."""
    os.makedirs(args.out, exist_ok=True)
    if listing is not None and listing.split_dir is None and not args.resume:
        write_splits(listing, os.path.join(args.out, "splits"))
    if not args.resume:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config_of(args), f, indent=1)


def agree(world: int, rank: int, error: Exception | None, value: bool = False, device: str = "cpu") -> bool:
    """Raise on every process if any process failed (torchrun), so none waits for the others;
    return rank 0's `value` (whether --out, which only rank 0 writes, has a checkpoint)."""
    if world == 1:
        if error is not None:
            raise error
        return value
    mine = torch.tensor([error is not None, bool(value)], dtype=torch.long, device=device)
    found = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(found, mine)
    failed = [r for r, f in enumerate(found) if f[0]]
    if error is not None:
        raise error
    if failed:
        raise UserError(f"rank {failed[0]} stopped with an error (printed by that process)")
    return bool(found[0][1])


def setup_distributed(args) -> tuple[int, int, bool]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) and pick
    this process's device. Returns (rank, world size, whether this call created the group)."""
    import datetime
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, False
    created = not dist.is_initialized()
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    if created:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.dist_timeout))
    return dist.get_rank(), dist.get_world_size(), created


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    rank, world, created = 0, 1, False
    try:
        args = resolve(args)
        rank, world, created = setup_distributed(args)
        return run(args, rank, world)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:   # a rank died or timed out: end here too, never hang
        lost = isinstance(e, torch.distributed.DistError) or any(w in str(e) for w in ("gloo", "NCCL", "peer"))
        if world == 1 or not lost:
            raise
        print(f"error: rank {rank} of {world}: lost the other processes ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); the last checkpoint in {args.out} is intact, "
              "continue with --resume", file=sys.stderr)
        return 1
    finally:
        if created:
            torch.distributed.destroy_process_group()


def run(args, rank: int = 0, world: int = 1) -> int:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    lead = rank == 0                     # logging, progress bars, evaluation and files: rank 0 only
    args.progress = args.progress and lead
    listing = error = resume = None
    try:                                 # every check first (cheap), then the expensive work; nothing written
        resume = check_out(args) if lead else None
        if args.dataset != "shapes":
            splits = args.splits
            made = os.path.join(args.out, "splits")       # a split made here by the run being resumed
            if args.resume and not splits and os.path.isdir(made):
                splits = made
            listing = list_images(args.dataset, args.data_root, args.domains.split(",") if args.domains else None,
                                  args.num_classes, splits, args.split_seed)
        domains, clients = build_data(args, listing)
        weights = check_weights(args)
        if lead and listing is not None:
            print(listing.summary(), file=sys.stderr)
        torch.manual_seed(args.seed)
        model, model_cfg = build_model(args, weights)
    except (UserError, DataError) as e:
        error = e
    resume = agree(world, rank, error, resume, args.device)
    for d in domains if listing is not None else ():
        d.train.transform = d.test.transform = make_transform(model_cfg, args.norm)
    device = torch.device(args.device)
    model.to(device)
    error = None
    if lead:
        try:
            write_out(args, listing)
        except OSError as e:
            error = UserError(f"cannot write to --out {args.out}: {e}")
    agree(world, rank, error, device=args.device)
    if lead and listing is not None and listing.split_dir is None and not args.resume:
        print(f"{args.dataset}: no split files found, so each (domain, class) was split train/test here "
              f"(seed {args.split_seed}); written to {args.out}/splits, reuse with --splits {args.out}/splits",
              file=sys.stderr)
    cfg = FedConfig(method=args.method, lr=args.lr, batch_size=args.batch_size, local_epochs=args.local_epochs,
                    local_steps=args.local_steps, participation=args.participation, seed=args.seed, amp=args.amp,
                    workers=args.workers, progress=args.progress, client_init=args.client_init,
                    local_head=args.local_head,
                    agg_options=dict(steps=args.fair_steps, lr=args.fair_lr, lam=args.fair_lam, init=args.fair_init,
                                     similarity=args.fair_similarity, correct=args.fair_correct))
    fed = Federation(model, domains, clients, cfg, device, rank, world)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    done = 0
    if args.resume:   # restore the checkpoint (if round 1 ever finished) and drop metrics of rounds after it
        if resume:
            with safe_open(os.path.join(args.out, "checkpoint.safetensors"), "pt") as f:
                done = int(f.metadata()["round"])
                fed.load_state_tensors({k: f.get_tensor(k).to(device) for k in f.keys()}, done)
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
        print(f"{args.method} on {args.dataset}: {len(clients)} clients over {len(domains)} domains, model "
              f"{args.model}, rank {args.rank}, {args.rounds} rounds, {world} process(es), device {device}",
              file=sys.stderr)

    acc = None
    for _ in tqdm(range(done, args.rounds), desc=args.method, initial=done, total=args.rounds,
                  disable=not args.progress):
        rec = fed.run_round()
        if not lead:
            continue
        tic = time.perf_counter()
        if rec["round"] % args.eval_every == 0 or rec["round"] == args.rounds:
            acc = fed.evaluate()
            rec["acc"] = acc
            tqdm.write(f"round {rec['round']:3d} | loss {rec['train_loss']:.3f} | cos(dW, applied) "
                       f"{rec['cos']:.4f} | mean acc {100 * acc['mean']:.2f}%", file=sys.stderr)
        rec["seconds"]["eval"] = time.perf_counter() - tic
        rec["unreadable"] = fed.unreadable()
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        save_checkpoint(fed, args.out)
    error = None
    if lead:
        try:
            finish(args, fed, acc)
        except (UserError, DataError) as e:
            error = e
    agree(world, rank, error, device=args.device)   # every process returns once rank 0 has finished the run
    if world > 1:
        # gloo's worker threads drop a finished collective's tensors after the call has returned, and
        # that needs the GIL; done during interpreter shutdown it aborts the process. A barrier and a
        # moment of sleep (both release the GIL) let them finish while this process still runs.
        torch.distributed.barrier()
        time.sleep(0.05)
    return 0


def export(args, fed: Federation) -> None:
    """The final global model for other tools: <out>/merged.safetensors (timm's own state dict,
    adapters merged, folds included, head included) and <out>/adapter/ (HF PEFT's format)."""
    from safetensors.torch import save_file
    merged = {k: v.detach().cpu().contiguous() for k, v in merged_state(fed.model).items()}
    save_file(merged, os.path.join(args.out, "merged.safetensors.tmp"), metadata={"model": args.model})
    os.replace(os.path.join(args.out, "merged.safetensors.tmp"), os.path.join(args.out, "merged.safetensors"))
    config, tensors = peft_adapter(fed.model, args.model)
    folder = os.path.join(args.out, "adapter")
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    folded = args.method in ("flora", "fedex") or args.client_init == "fresh"
    note = os.path.join(folder, "NOTE.txt")
    if folded:   # the backbone itself was changed: the adapter alone does not hold the trained model
        with open(note, "w") as f:
            f.write(f"This run ({args.method}, --client-init {args.client_init}) folded updates into the backbone "
                    "weights, which a PEFT adapter cannot carry: loaded on the original backbone, this adapter "
                    "leaves them out. The trained model is ../merged.safetensors.\n")
        print(f"note: {args.method} changed the backbone weights; use {args.out}/merged.safetensors, not the "
              "adapter alone", file=sys.stderr)
    elif os.path.exists(note):
        os.remove(note)


def finish(args, fed: Federation, acc: dict | None) -> None:
    """Rank 0, after the last round: final evaluation, report, final.safetensors."""
    from safetensors.torch import save_file
    acc = acc or fed.evaluate()
    if fed.unreadable():
        print("warning: images that could not be decoded were left out of training and evaluation: " + ", ".join(
            f"{d} {n['train']} train / {n['test']} test" for d, n in fed.unreadable().items()), file=sys.stderr)
    final = {k: v for k, v in fed.state_tensors().items() if k.startswith(("global/", "base/"))}
    save_file(final, os.path.join(args.out, "final.safetensors.tmp"), metadata={"method": args.method})
    os.replace(os.path.join(args.out, "final.safetensors.tmp"), os.path.join(args.out, "final.safetensors"))
    export(args, fed)
    print(f"\n{'domain':<12s} top-1 (%)")
    for name, a in acc.items():
        print(f"{name:<12s} {100 * a:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
