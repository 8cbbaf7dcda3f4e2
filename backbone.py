"""The backbone: a timm ViT or MLP-Mixer, its pretrained weights, LoRA injected.

Weights are read by timm's own machinery (`timm.models.load_state_dict` for `.safetensors`,
`.pth`/`.bin` and timm training checkpoints; the model family's `checkpoint_filter_fn` for
position-embedding resizing and foreign layouts; `VisionTransformer.load_pretrained` for Google's
`.npz`), then checked tensor by tensor against the model, built on the meta device so that a
checkpoint that cannot fit is refused before anything is built: with what it looks like and which
--model would take it. Hub weights come from the local cache when it has them (no network); if it
has not and the hub cannot be reached, that is said at once.

The embedded dataset's backbones (`vit_shapes`, a 4-block ViT, and `mixer_shapes`, a 4-block
MLP-Mixer, on 32 px glyphs) are pretrained here once, the same way, on classes of the generator
the task never sees, and cached.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
from urllib.parse import urlparse

import torch

from data import shapes_split
from lora import inject_lora

LORA_TARGETS = {"vit": ["attn.proj", "mlp.fc2"], "mixer": ["mlp_tokens.fc2", "mlp_channels.fc2"]}
CACHE = os.environ.get("LORAFAIR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lorafair"))
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backbones")
SHIPPED = {   # the embedded backbones behind the committed results, by file name (recipe tag): sha256
    "shapes_vit_bd9dad67ef.safetensors": "2f9ad07fce7264f65dc7d780b238211c3332cab76063da4c2f9def42a7cf7286",
    "shapes_mixer_e462598473.safetensors": "13c0b2693b05e9bf832e6941ec2b05c298cf15fb0fb69ee2c85fa9d718f1fc4e",
}


class ModelError(ValueError):
    """Bad model input (weights that cannot be read or fit, unreachable hub, LoRA targets): one line."""


def shapes_vit(num_classes: int):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=num_classes)


def shapes_mixer(num_classes: int):
    """The embedded MLP-Mixer: 4 blocks of width 128 on 8 x 8 patches of 4 px, about the ViT's size."""
    from timm.models.mlp_mixer import MlpMixer
    return MlpMixer(num_classes=num_classes, img_size=32, patch_size=4, num_blocks=4, embed_dim=128)


SHAPES_MODELS = {"vit_shapes": shapes_vit, "mixer_shapes": shapes_mixer}   # --model names of the embedded backbones


def _register_with_timm() -> None:
    """Make the embedded backbones timm models: after `import backbone`,
    `timm.create_model("vit_shapes", pretrained=True, num_classes=N)` builds one with its shipped
    weights (a new head), so a run's merged.safetensors and adapter/ load as any timm model's do."""
    from timm.models import is_model, register_model
    exported = "__all__" in globals()
    for name, build in SHAPES_MODELS.items():
        if is_model(name):
            continue

        def entry(pretrained=False, num_classes=10, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                  _name=name, _build=build):
            model = _build(num_classes)
            if pretrained:
                from safetensors.torch import load_file
                missing, unexpected = model.load_state_dict(load_file(pretrained_shapes_backbone(
                    model=_name, progress=False)), strict=False)
                assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
            return model
        entry.__name__ = entry.__qualname__ = name
        register_model(entry)
    if not exported:                     # timm lists a registrant's models in its __all__: not this module's API
        del globals()["__all__"]


def pretrained_shapes_backbone(epochs: int = 12, per_domain: int = 2000, progress: bool = True,
                               cache: str = CACHE, model: str = "vit_shapes") -> str:
    """An embedded backbone (SHAPES_MODELS) trained on classes 10..39 of the shapes generator
    (disjoint from every task's, data.shapes_task_classes). The repository ships the weights this
    recipe made (backbones/, SHIPPED: their sha256), so every machine loads the same bytes;
    only another recipe (epochs, per_domain), or a backbone not shipped, is trained here, once,
    and cached outside the repo. Both backbones get the same data, schedule and seed, on 2 threads
    whatever the caller's setting; the weights still depend on the CPU's arithmetic, which is why
    the bytes, not the recipe, are what the results rest on. Returns the file."""
    family = model.split("_")[0]
    tag = hashlib.sha1(f"shapes-{family}-v1-{epochs}-{per_domain}".encode()).hexdigest()[:10]
    name = f"shapes_{family}_{tag}.safetensors"
    if name in SHIPPED:
        shipped = os.path.join(SHIPPED_DIR, name)
        with open(shipped, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != SHIPPED[name]:
            raise ModelError(f"{shipped} has sha256 {digest}, not the shipped {SHIPPED[name]}; restore it from the "
                             "repository (git checkout -- backbones/)")
        return shipped
    path = os.path.join(cache, name)
    if os.path.isfile(path):
        return path
    print(f"pretraining the embedded {model} backbone once (cached in {path}) ...", file=sys.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)             # the weights depend on how sums are split over threads: fixed
    try:
        return _pretrain(path, model, epochs, per_domain, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(path: str, model: str, epochs: int, per_domain: int, progress: bool) -> str:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from data import PRETRAIN_CLASSES
    torch.manual_seed(0)
    xs, ys = zip(*(shapes_split(d, per_domain, range(*PRETRAIN_CLASSES), seed=5000 + d) for d in range(6)))
    x, y = (torch.cat(xs) - 0.5) / 0.5, torch.cat(ys)
    model = SHAPES_MODELS[model](PRETRAIN_CLASSES[1] - PRETRAIN_CLASSES[0])
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    tmp = f"{path}.{os.getpid()}.tmp"    # two processes pretraining at once never write one file
    save_file(state, tmp)
    os.replace(tmp, path)
    return path


def bare_model(args, device=None):
    """The backbone with a new head and no weights loaded (on `device`, e.g. 'meta': no memory)."""
    import timm
    with torch.device(device or "cpu"):
        if args.model in SHAPES_MODELS:
            return SHAPES_MODELS[args.model](args.num_classes)
        kw = {"img_size": 32} if args.dataset == "shapes" else {}
        return timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kw)


VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
MIXER_SIZES = {512: "s", 768: "b", 1024: "l"}


def describe_weights(state: dict) -> tuple[str, str | None]:
    """What a state dict seems to be the weights of, and the --model that would take it."""
    import timm

    def name_if_known(name):
        return name if name in SHAPES_MODELS or timm.is_model(name) else None
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
        name = ("mixer_shapes" if (D, blocks, p, img) == (128, 4, 4, 32) else
                f"mixer_{MIXER_SIZES.get(D, D)}{p}_{img}")
        return f"an MLP-Mixer of width {D}, depth {blocks}, patch {p} at {img} px", name_if_known(name)
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "a ResNet (LoRA here targets ViTs and MLP-Mixers)", None
    return f"no model this code knows ({len(state)} tensors, first {next(iter(state), None)!r})", None


def _misfit(path: str, args, state: dict, detail: str) -> ModelError:
    desc, name = describe_weights(state)
    fix = (f"pass --model {name}" if name and name != args.model else f"pass weights of a {args.model}")
    return ModelError(f"--checkpoint {path} does not fit {args.model}: it looks like {desc} ({detail}); {fix}")


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
            raise ModelError(f"--checkpoint {path} is a folder without model.safetensors or pytorch_model.bin; "
                            f"pass the weights file itself" + (f" (it holds {', '.join(files[:5])})" if files else ""))
        path = os.path.join(path, inside[0])
    if not os.path.isfile(path):
        raise ModelError(f"--checkpoint {path} does not exist")
    if path.endswith(".npz"):
        return path
    try:
        state = timm.models.load_state_dict(path, use_ema=False)
    except RuntimeError as e:
        if "non-allowlisted" not in str(e):
            raise ModelError(f"--checkpoint {path} could not be read ({str(e).splitlines()[0]})")
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        shown = ", ".join(([n for n in names if not n.startswith("torch.")] or names)[:2])
        raise ModelError(f"--checkpoint {path} holds pickled Python objects ({len(names)} classes such as {shown}), "
                        "e.g. a whole saved model, "
                        "not weights; unpickling could run code, so it is not loaded. If you trust it, save its "
                        "state_dict() once and pass that file")
    except Exception as e:   # truncated, not a checkpoint at all, ...
        raise ModelError(f"--checkpoint {path} could not be read as weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--checkpoint {path} holds no state dict of tensors")
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
        raise ModelError(f"--checkpoint {path} could not be read as an .npz archive ({type(e).__name__})")
    prefix = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in keys), None)
    if prefix is None:
        raise ModelError(f"--checkpoint {path} is an .npz without ViT weights (no embedding/kernel)")
    p, _, _, D = w[f"{prefix}embedding/kernel"].shape
    depth = len({k.split("/")[1] for k in keys if k.startswith(f"{prefix}Transformer/encoderblock_")})
    if not hasattr(model, "load_pretrained") or not hasattr(model, "patch_embed"):
        raise ModelError(f"--checkpoint {path} holds ViT .npz weights (width {D}, depth {depth}); {args.model} "
                        "is not a ViT: pass a ViT --model or weights as .safetensors/.pth")
    if (D, depth) != (model.embed_dim, len(model.blocks)):
        size = VIT_SIZES.get(D)
        raise ModelError(f"--checkpoint {path} does not fit {args.model}: it holds ViT .npz weights of width {D}, "
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
        raise ModelError(f"--model {model_name}: {e}")
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ModelError(f"timm has no pretrained weights for {model_name}; pass --checkpoint PATH or --no-pretrained")
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
    if args.model in SHAPES_MODELS:
        return "shapes", None, None
    path = cached_pretrained(args.model)
    if path:
        return "file", read_checkpoint(path), path
    if not hub_reachable():
        import huggingface_hub.constants as hf
        raise ModelError(f"pretrained weights for {args.model} are not in the local cache ({hf.HF_HUB_CACHE}) and "
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
            raise ModelError(f"could not download pretrained weights for {args.model} ({type(e).__name__}); "
                            "pass --checkpoint PATH (local weights) or --no-pretrained")
    else:
        model = bare_model(args)
        if kind == "shapes":
            kind, path = "file", pretrained_shapes_backbone(progress=args.progress, model=args.model)
            loaded = read_checkpoint(path)
        if kind == "file" and isinstance(loaded, str):
            model.load_pretrained(loaded)                        # timm's reader of Google's .npz
        elif kind == "file":
            model.load_state_dict(fit_checkpoint(model, loaded, path, args), strict=False)
    cfg = ({"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3} if args.model in SHAPES_MODELS
           else timm.data.resolve_data_config({}, model=model))
    family = "mixer" if "mixer" in args.model else "vit"
    targets = args.lora_targets.split(",") if args.lora_targets else LORA_TARGETS[family]
    try:
        inject_lora(model, targets, r=args.rank, alpha=args.alpha, dropout=args.lora_dropout, seed=args.seed)
    except ValueError as e:
        raise ModelError(str(e).splitlines()[0])
    return model, cfg


_register_with_timm()
