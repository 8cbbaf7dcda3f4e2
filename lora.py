"""LoRA for timm models: y = W0 x + b + s * B A x, with W0 frozen and s = alpha / r.

A: (r, d_in), initialised like nn.Linear's weight (Kaiming-uniform, a = sqrt(5)); B: (d_out, r),
zeros, so a fresh adapter is a no-op. Adapter state is a plain dict whose keys end in
`lora_A.weight` / `lora_B.weight`, as in HF PEFT, so adapters move to and from PEFT-style code.

Two wrappers:
  LoRALinear  one adapter over all outputs of an nn.Linear (attn.proj, mlp.fc2, Mixer's fc2s);
  LoRAQKV     separate q and v adapters on timm's fused attn.qkv (outputs laid out [q | k | v]);
              the k rows are never touched.
Merging is explicit (merge()/unmerge()); train()/eval() never change the weights.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn


class LoRA(nn.Module):
    """The adapter itself: x -> s * B A dropout(x), with keys lora_A.weight and lora_B.weight."""

    def __init__(self, d_in: int, d_out: int, *, r: int, alpha: float, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        if not (isinstance(r, int) and 1 <= r <= min(d_in, d_out)):
            raise ValueError(f"LoRA rank r = {r!r} must be an integer in 1..min(d_in, d_out) = {min(d_in, d_out)}")
        self.r, self.alpha = r, float(alpha)
        self.scaling = float(alpha) / r          # float division: alpha = 8, r = 16 gives 0.5, not 0
        self.lora_A = nn.Linear(d_in, r, bias=False, device=device, dtype=dtype)   # weight: (r, d_in)
        self.lora_B = nn.Linear(r, d_out, bias=False, device=device, dtype=dtype)  # weight: (d_out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """A ~ Kaiming-uniform(a = sqrt(5)) (nn.Linear's default, bound 1/sqrt(d_in)), B = 0."""
        bound = 1.0 / math.sqrt(self.lora_A.in_features)
        A = torch.rand(self.lora_A.weight.shape, generator=generator, dtype=torch.float32) * 2 - 1
        self.lora_A.weight.copy_(A * bound)
        self.lora_B.weight.zero_()

    def lora_forward(self, x: Tensor) -> Tensor:
        return self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))

    def delta_weight(self) -> Tensor:
        """s * B A: (d_out, d_in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)


class LoRALinear(LoRA):
    """nn.Linear with one adapter over all its outputs."""

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, r=r, alpha=alpha, dropout=dropout,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.base = base.requires_grad_(False)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y if self.merged else y + self.lora_forward(x)

    def adapters(self) -> dict[str, tuple[LoRA, slice]]:
        return {"": (self, slice(None))}

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s B A, after which forward skips the adapter. Undo with unmerge()."""
        if self.merged:
            raise RuntimeError("merge() called on an already merged layer")
        self.base.weight += self.delta_weight().to(self.base.weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("unmerge() called on a layer that is not merged")
        self.base.weight -= self.delta_weight().to(self.base.weight)
        self.merged = False


class LoRAQKV(nn.Module):
    """timm's fused qkv Linear (d_out = 3 d) with adapters on the q and v rows only."""

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.out_features % 3:
            raise ValueError(f"qkv layer has {base.out_features} outputs, not a multiple of 3 ([q | k | v])")
        d = base.out_features // 3
        self.base = base.requires_grad_(False)
        kw = dict(r=r, alpha=alpha, dropout=dropout, device=base.weight.device, dtype=base.weight.dtype)
        self.q = LoRA(base.in_features, d, **kw)
        self.v = LoRA(base.in_features, d, **kw)
        self.d = d
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)                                             # (..., 3 d)
        if self.merged:
            return y
        dq, dv = self.q.lora_forward(x), self.v.lora_forward(x)      # (..., d) each
        return y + torch.cat((dq, torch.zeros_like(dq), dv), dim=-1)

    def adapters(self) -> dict[str, tuple[LoRA, slice]]:
        return {"q": (self.q, slice(0, self.d)), "v": (self.v, slice(2 * self.d, 3 * self.d))}

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("merge() called on an already merged layer")
        for lora, rows in self.adapters().values():
            self.base.weight[rows] += lora.delta_weight().to(self.base.weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("unmerge() called on a layer that is not merged")
        for lora, rows in self.adapters().values():
            self.base.weight[rows] -= lora.delta_weight().to(self.base.weight)
        self.merged = False


# ----------------------------------------------------------------------------- models

def _matches(name: str, pattern: str) -> bool:
    """'attn.proj' matches 'blocks.3.attn.proj'; glob patterns ('blocks.1*.mlp.fc2') match whole names."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def inject_lora(model: nn.Module, targets: Iterable[str], *, r: int, alpha: float, dropout: float = 0.0,
                seed: int = 0) -> nn.Module:
    """Wrap every nn.Linear whose name matches a target; freeze all but LoRA and the classifier head.

    A target whose last name component is `qkv` gets q/v adapters (LoRAQKV); any other gets one
    adapter (LoRALinear). The head is timm's `get_classifier()`. Every adapter's A is drawn from
    one generator seeded with `seed`, so the same seed gives the same initial adapter everywhere.
    Modifies `model` in place and returns it.
    """
    targets = list(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(_matches(n, t) for t in targets)]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"no nn.Linear matches the LoRA targets {targets}; this model's Linear layers "
                         f"include {linears}")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        wrapper = LoRAQKV if child == "qkv" else LoRALinear
        setattr(parent, child, wrapper(base, r=r, alpha=alpha, dropout=dropout))
    reset_lora(model, seed)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module):
        head.requires_grad_(True)
    return model


def lora_layers(model: nn.Module) -> dict[str, tuple[LoRA, nn.Linear, slice]]:
    """Every adapter by its state-dict prefix: prefix -> (adapter, base Linear, rows of W0 it adds to)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAQKV)):
            for sub, (lora, rows) in m.adapters().items():
                out[f"{name}.{sub}" if sub else name] = (lora, m.base, rows)
    return out


@torch.no_grad()
def reset_lora(model: nn.Module, seed: int) -> None:
    """Re-initialise every adapter (A random, B = 0) from one generator: same seed, same adapters."""
    g = torch.Generator().manual_seed(seed)
    for lora, _, _ in lora_layers(model).values():
        lora.reset_parameters(g)


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter state: {'<prefix>.lora_A.weight': (r, d_in), '<prefix>.lora_B.weight': (d_out, r)}."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(("lora_A.weight", "lora_B.weight"))}


@torch.no_grad()
def load_lora_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy named tensors (adapters, and the head or any other parameter) into the model; every key
    must name a parameter of the same shape, else nothing is copied."""
    params = dict(model.named_parameters())
    for k, v in state.items():
        if k not in params:
            raise ValueError(f"adapter key {k!r} is not a parameter of this model (wrong targets or model?)")
        if params[k].shape != v.shape:
            raise ValueError(f"adapter {k!r}: shape {tuple(v.shape)} does not match the model's "
                             f"{tuple(params[k].shape)} (different rank?)")
    for k, v in state.items():
        params[k].copy_(v)


@torch.no_grad()
def fold_into_base(model: nn.Module, delta_w: Mapping[str, Tensor]) -> None:
    """W0[rows] += s * delta_w for each adapter prefix (FLoRA's, FLoRIST's and FedEx-LoRA's fold; B @ A units)."""
    layers = lora_layers(model)
    for prefix, d in delta_w.items():
        if prefix not in layers:
            raise ValueError(f"no LoRA layer named {prefix!r} to fold an update into")
        lora, base, rows = layers[prefix]
        base.weight[rows] += lora.scaling * d.to(base.weight)


@torch.no_grad()
def frlora_start(model: nn.Module) -> dict[str, Tensor]:
    """FRLoRA's start on every adapter (aggregators.frlora_init): A and B take the top-r singular
    components of the rows of W0 they add to, W0 keeps the rest, so the model computes what it did.
    Returns the initial adapter {'<prefix>.lora_A.weight': A0, '<prefix>.lora_B.weight': B0}."""
    from aggregators import frlora_init
    out = {}
    for prefix, (lora, base, rows) in lora_layers(model).items():
        A0, B0, rest = frlora_init(base.weight[rows], lora.r, lora.scaling)
        lora.lora_A.weight.copy_(A0)
        lora.lora_B.weight.copy_(B0)
        base.weight[rows] = rest
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = A0.clone(), B0.clone()
    return out


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Everything a client uploads: the adapters and the other trainable tensors (the head)."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad
            or k.endswith(("lora_A.weight", "lora_B.weight"))}


# ----------------------------------------------------------------------------- export

def merged_state(model: nn.Module) -> dict[str, Tensor]:
    """The model as a plain state dict under the backbone's own names (timm's), every adapter
    merged into its base weight: W = W0 + s B A (q and v rows of a fused qkv)."""
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAQKV))}
    out = {}
    for k, v in model.state_dict().items():
        owner = next((n for n in wrappers if k.startswith(n + ".")), None)
        if owner is None:
            out[k] = v.detach().clone()
        elif k.startswith(owner + ".base."):
            out[owner + k[len(owner) + 5:]] = v.detach().clone()
    for name, m in wrappers.items():
        if not m.merged:
            for lora, rows in m.adapters().values():
                out[name + ".weight"][rows] += lora.delta_weight().detach().to(out[name + ".weight"])
    return out


def peft_adapter(model: nn.Module, base_model: str | None = None) -> tuple[dict, dict[str, Tensor]]:
    """The adapters and the head in HF PEFT's LoRA format: (adapter_config.json as a dict, the tensors
    of adapter_model.safetensors). Written without importing PEFT; `PeftModel.from_pretrained` on
    the same backbone gives this model's outputs.

    target_modules lists the exact names of the wrapped layers (PEFT matches name suffixes, so a
    loose 'proj' would also catch the patch embedding). PEFT has no q/v-only adapter on a fused qkv,
    so it becomes one adapter of rank 2 r with A = [A_q; A_v] and B = [[B_q, 0], [0, 0], [0, B_v]]
    (rows q, k, v), whose product is exactly the q/v update; rank_pattern and alpha_pattern (2 r,
    2 alpha) keep the scaling alpha / r. That is exact for inference, but training it in PEFT is not
    the same parameterisation (the zero blocks of B would learn). Any layer whose B ends in zero
    columns (SpecTraL keeps fewer components than r in some layers) is exported at the rank it
    holds, with rank_pattern and alpha_pattern (alpha r_l / r, the same scaling): the same outputs.
    """
    tensors, targets, rank_pattern, alpha_pattern, loras = {}, [], {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            A, B, loras = m.lora_A.weight, m.lora_B.weight, loras + [m]
            held = int((B.detach().abs().amax(0) > 0).nonzero().max()) + 1 if B.detach().any() else m.r
            if held < m.r:            # trailing zero columns of B add nothing: a smaller rank, the same scaling
                A, B = A[:held], B[:, :held]
                rank_pattern[name], alpha_pattern[name] = held, m.alpha * held / m.r
        elif isinstance(m, LoRAQKV):
            d, r = m.d, m.q.r
            A = torch.cat([m.q.lora_A.weight, m.v.lora_A.weight])                      # (2 r, d_in)
            B = torch.zeros(3 * d, 2 * r, dtype=A.dtype, device=A.device)              # (3 d, 2 r)
            B[:d, :r], B[2 * d:, r:] = m.q.lora_B.weight, m.v.lora_B.weight
            rank_pattern[name], alpha_pattern[name] = 2 * r, 2 * m.q.alpha
            loras += [m.q, m.v]
        else:
            continue
        targets.append(name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().clone().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().clone().contiguous()
    if not loras:
        raise ValueError("the model has no LoRA layers to export")
    if len({(x.r, x.alpha) for x in loras}) > 1:
        raise ValueError("PEFT export expects one rank and alpha for every adapter")
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_name = next((n for n, x in model.named_modules() if x is head), None) if isinstance(head, nn.Module) else None
    if head_name:
        for k, v in head.state_dict().items():
            tensors[f"base_model.model.{head_name}.{k}"] = v.detach().clone().contiguous()
    p = loras[0].lora_dropout.p if isinstance(loras[0].lora_dropout, nn.Dropout) else 0.0
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
              "r": loras[0].r, "lora_alpha": loras[0].alpha, "lora_dropout": p, "target_modules": targets,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "modules_to_save": [head_name] if head_name else None, "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "inference_mode": True}
    return config, tensors
