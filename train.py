"""Federated LoRA fine-tuning, the single entrypoint.

    python train.py                                     # embedded 'shapes' dataset, offline, minutes on CPU
    python train.py --method lorafair --dataset domainnet --data-root /data/domainnet
    python train.py --dataset nicopp --data-root /data/nicopp --model mixer_b16_224.goog_in21k

Defaults that differ per dataset are in DATASET_DEFAULTS (the paper's values for DomainNet and
NICO++; small, CPU-sized ones for the embedded dataset). Output in --out: config.json,
metrics.jsonl (one record per round), checkpoint.safetensors (every round, atomic) and
final.safetensors (global adapter + head).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch

from aggregators import AGGREGATORS
from data import DataError, load_image_domains, load_shapes, make_transform, partition, shapes_split
from fed import Client, FedConfig, Federation
from lora import inject_lora

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


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Federated LoRA fine-tuning (LoRA-FAIR and baselines)")
    p.add_argument("--method", default="lorafair", choices=list(AGGREGATORS))
    p.add_argument("--dataset", default="shapes", choices=list(DATASET_DEFAULTS),
                   help="shapes: embedded, generated offline (default)")
    p.add_argument("--data-root", default=None, help="DomainNet / NICO++ root with <domain>_{train,test}.txt")
    p.add_argument("--domains", default=None, help="comma-separated subset of the dataset's domains")
    p.add_argument("--num-classes", type=int, default=None, help="DomainNet: first N classes (100; 345 = all)")
    p.add_argument("--clients-per-domain", type=int, default=1, help="1 = feature non-IID (Table 1)")
    p.add_argument("--dirichlet", type=float, default=0.5, help="label skew within a domain when >1 client each")
    p.add_argument("--n-train", type=int, default=None, help="shapes: training images per domain (320)")
    p.add_argument("--n-test", type=int, default=None, help="shapes: test images per domain (200)")
    p.add_argument("--norm", default="model", choices=["model", "clip"], help="normalisation statistics")
    p.add_argument("--model", default=None, help="timm ViT or MLP-Mixer name (default per dataset)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--checkpoint", default=None, help="local backbone weights (.safetensors or .pth)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default max(8, 2 r))")
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names, e.g. attn.qkv,attn.proj")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--local-steps", type=int, default=None, help="cap on local steps per round")
    p.add_argument("--client-init", default="global", choices=["global", "fresh", "local"],
                   help="clients start a round from the global adapter (paper), a fresh LoRA, or their own last one")
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
    if args.dataset != "shapes" and not args.data_root:
        raise UserError(f"--dataset {args.dataset} needs --data-root (the directory holding <domain>_train.txt)")
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


def load_backbone_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def build_model(args):
    import timm
    if args.model == "vit_shapes":
        model = shapes_vit(args.num_classes)
        path = args.checkpoint or (pretrained_shapes_backbone(progress=args.progress) if args.pretrained else None)
        cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    else:
        if args.model not in timm.list_models(pretrained=True) and args.model not in timm.list_models():
            raise UserError(f"unknown model {args.model!r}; pass a timm ViT or MLP-Mixer name "
                            "(e.g. vit_base_patch16_224.augreg_in21k, mixer_b16_224.goog_in21k)")
        kw = {"img_size": 32} if args.dataset == "shapes" else {}
        try:
            model = timm.create_model(args.model, pretrained=args.pretrained and not args.checkpoint,
                                      num_classes=args.num_classes, **kw)
        except Exception as e:  # offline hub, missing weights
            raise UserError(f"could not load pretrained weights for {args.model} ({type(e).__name__}); this "
                            "machine may be offline: pass --checkpoint PATH (local weights) or --no-pretrained")
        path = args.checkpoint
        cfg = timm.data.resolve_data_config({}, model=model)
    if path:
        state = {k: v for k, v in load_backbone_file(path).items() if not k.startswith("head")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise UserError(f"{path} does not fit {args.model}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    family = "mixer" if "mixer" in args.model else "vit"
    targets = args.lora_targets.split(",") if args.lora_targets else LORA_TARGETS[family]
    try:
        inject_lora(model, targets, r=args.rank, alpha=args.alpha, dropout=args.lora_dropout, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0])
    return model, cfg


def build_data(args, model_cfg):
    domains = args.domains.split(",") if args.domains else None
    if args.dataset == "shapes":
        doms = load_shapes(domains, args.n_train, args.n_test)
    else:
        doms = load_image_domains(args.data_root, args.dataset, domains, args.num_classes,
                                  make_transform(model_cfg, args.norm))
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


def prepare_out(args) -> int:
    """Create or check --out; return the number of rounds already done (resume)."""
    cfg_path, ckpt = os.path.join(args.out, "config.json"), os.path.join(args.out, "checkpoint.safetensors")
    if not args.resume:
        if os.path.exists(cfg_path):
            raise UserError(f"{args.out} already holds a run; pass --resume to continue it or a new --out")
        os.makedirs(args.out, exist_ok=True)
        with open(cfg_path, "w") as f:
            json.dump(config_of(args), f, indent=1)
        return 0
    if not os.path.isfile(cfg_path) or not os.path.isfile(ckpt):
        raise UserError(f"--resume: {args.out} has no config.json and checkpoint.safetensors to resume from")
    with open(cfg_path) as f:
        old = json.load(f)
    new = config_of(args)
    diff = sorted(k for k in set(old) | set(new) if k not in RESUME_FREE and old.get(k) != new.get(k))
    if diff:
        raise UserError(f"--resume: {args.out} was run with a different configuration ("
                        + ", ".join(f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in diff[:4]) + ")")
    return -1


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
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    lead = rank == 0                     # logging, progress bars, evaluation and files: rank 0 only
    args.progress = args.progress and lead
    status = [0, ""]
    if lead:
        try:
            status = [prepare_out(args), ""]
        except UserError as e:
            status = [-2, str(e)]
    if world > 1:
        torch.distributed.broadcast_object_list(status, src=0)
    if status[0] == -2:
        raise UserError(status[1] if lead else f"rank 0 refused the run: {status[1]}")
    done = status[0]
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, model_cfg = build_model(args)
    model.to(device)
    domains, clients = build_data(args, model_cfg)
    cfg = FedConfig(method=args.method, lr=args.lr, batch_size=args.batch_size, local_epochs=args.local_epochs,
                    local_steps=args.local_steps, participation=args.participation, seed=args.seed, amp=args.amp,
                    workers=args.workers, progress=args.progress, client_init=args.client_init,
                    agg_options=dict(steps=args.fair_steps, lr=args.fair_lr, lam=args.fair_lam, init=args.fair_init,
                                     similarity=args.fair_similarity, correct=args.fair_correct))
    fed = Federation(model, domains, clients, cfg, device, rank, world)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if done < 0:   # resume: restore the checkpoint and drop metrics of rounds after it
        ckpt = os.path.join(args.out, "checkpoint.safetensors")
        with safe_open(ckpt, "pt") as f:
            done = int(f.metadata()["round"])
            fed.load_state_tensors({k: f.get_tensor(k).to(device) for k in f.keys()}, done)
        if lead and os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                keep = [line for line in f if json.loads(line)["round"] <= done]
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(metrics_path + ".tmp", metrics_path)
        if lead:
            print(f"resuming {args.out} after round {done}", file=sys.stderr)
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
        rec["skipped_images"] = fed.skipped_images
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        save_checkpoint(fed, args.out)
    if not lead:
        return 0
    if fed.skipped_images:
        print(f"warning: {fed.skipped_images} unreadable images were skipped", file=sys.stderr)

    acc = acc or fed.evaluate()
    final = {k: v for k, v in fed.state_tensors().items() if not k.startswith("client")}  # global/ and base/
    save_file(final, os.path.join(args.out, "final.safetensors.tmp"), metadata={"method": args.method})
    os.replace(os.path.join(args.out, "final.safetensors.tmp"), os.path.join(args.out, "final.safetensors"))
    print(f"\n{'domain':<12s} top-1 (%)")
    for name, a in acc.items():
        print(f"{name:<12s} {100 * a:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
