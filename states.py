"""Aggregate whole client state dicts: find the LoRA pairs by name, stack same-shape layers, run
one method of aggregators.py per stack, FedAvg everything else.

Keys as this project, HF PEFT's saved adapters and a live PEFT model write them:

    <prefix>.lora_A.weight  (r, d_in)            <prefix>.lora_B.weight  (d_out, r)
    <prefix>.lora_A.<adapter>.weight             <prefix>.lora_B.<adapter>.weight

This file and aggregators.py depend on torch and the standard library only; copy both.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from aggregators import bias_bounds, check_weights, diagnostics, get_aggregator, lorafair_groups


class StateUpdate(NamedTuple):
    state: dict[str, Tensor]    # new global adapter keys (where the method returns them) and the rest, FedAvg'd
    delta_w: dict[str, Tensor]  # layer prefix -> delta_w to fold into that layer's base weight
    cos: dict[str, float]       # layer prefix -> cos(dW, dW_applied)
    rel_err: dict[str, float]   # layer prefix -> ||dW - dW_applied|| / ||dW||
    cos_fedit: dict[str, float]  # layer prefix -> FedIT's cos(dW, B_bar A_bar), the bias before any fix
    ceiling: dict[str, float]   # layer prefix -> max over B' of cos(dW, B' A_bar) (aggregators.bias_bounds)


def _lora_key(key: str) -> Optional[tuple[str, str, Optional[str]]]:
    """(layer prefix, 'A' or 'B', adapter name or None) of `<prefix>.lora_A.weight` (this project,
    PEFT's saved adapter files) or `<prefix>.lora_A.<adapter>.weight` (a live PEFT model's
    state_dict(), e.g. adapter 'default'); None for any other key."""
    parts = key.split(".")
    if parts[-1] != "weight":
        return None
    for i in (-2, -3):
        if len(parts) > -i and parts[i] in ("lora_A", "lora_B"):
            return ".".join(parts[:i]), parts[i][-1], parts[-2] if i == -3 else None
    return None


def lora_pairs(keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Layer prefix -> (key of A, key of B), in either key form `_lora_key` reads."""
    found: dict[tuple[str, Optional[str]], dict[str, str]] = {}
    for key in keys:
        m = _lora_key(key)
        if m:
            found.setdefault((m[0], m[2]), {})[m[1]] = key
    pairs: dict[str, tuple[str, str]] = {}
    for (prefix, adapter), f in found.items():
        if set(f) != {"A", "B"}:
            have, lack = next(iter(f.values())), "B" if "A" in f else "A"
            raise ValueError(f"layer {prefix}: has {have} but no lora_{lack} weight")
        if prefix in pairs:
            raise ValueError(f"layer {prefix}: several adapters ({adapter} and another); pass one adapter's weights")
        pairs[prefix] = (f["A"], f["B"])
    return pairs


def aggregate_states(states: Sequence[Mapping[str, Tensor]], weights, method: str,
                     **options) -> StateUpdate:
    """Aggregate whole client state dicts with one method.

    LoRA factors are found by name: `<prefix>.lora_A.weight` / `<prefix>.lora_B.weight` (this
    project and HF PEFT's saved adapters, `get_peft_model_state_dict`) or
    `<prefix>.lora_A.<adapter>.weight` (a PEFT model's own `state_dict()`); the result uses the
    same keys. Layers of the same shape are stacked into one batched call of the method; every
    other floating key (e.g. the classifier head) is FedAvg'd, sum_k p_k x_k; non-floating keys
    must agree across clients and are copied. A state with no LoRA pair at all is an error (it
    would otherwise be averaged as FedAvg, whatever the method).
    """
    fn = get_aggregator(method)
    K = len(states)
    w = check_weights(torch.as_tensor(weights, dtype=torch.float64), K, layer="state dicts")
    keys = list(states[0].keys())
    for k, s in enumerate(states[1:], start=1):
        if set(s.keys()) != set(keys):
            diff = sorted(set(s.keys()) ^ set(keys))
            raise ValueError(f"client {k}'s state dict has different keys from client 0's: {diff[:5]}")
    pairs = lora_pairs(keys)
    if not pairs:
        raise ValueError(f"no LoRA layer found among the {len(keys)} keys (e.g. {keys[:4]}); expected pairs "
                         "'<layer>.lora_A.weight' / '<layer>.lora_B.weight' or '<layer>.lora_A.<adapter>.weight'")

    groups: dict[tuple, list[str]] = {}
    for p, (ka, kb) in pairs.items():
        A0, B0 = states[0][ka], states[0][kb]
        for k, s in enumerate(states):
            if s[ka].shape != A0.shape or s[kb].shape != B0.shape:
                raise ValueError(f"layer {p}: client {k}'s factors have shapes {tuple(s[ka].shape)}, "
                                 f"{tuple(s[kb].shape)}; client 0's are {tuple(A0.shape)}, {tuple(B0.shape)}")
        groups.setdefault((tuple(A0.shape), tuple(B0.shape), A0.dtype, A0.device), []).append(p)

    stacks = []
    for group in groups.values():
        A = torch.stack([torch.stack([s[pairs[p][0]] for s in states]) for p in group])  # (L, K, r, d_in)
        B = torch.stack([torch.stack([s[pairs[p][1]] for s in states]) for p in group])  # (L, K, d_out, r)
        stacks.append((group, A, B, w.to(A.device)))
    if method == "lorafair":
        updates = lorafair_groups(stacks, **options)
    else:
        updates = [fn(A, B, wg, layer=group, **options) for group, A, B, wg in stacks]

    out = StateUpdate({}, {}, {}, {}, {}, {})
    for (group, A, B, wg), upd in zip(stacks, updates):
        cos, rel = diagnostics(upd, A, B, wg)
        fedit_cos, ceiling = bias_bounds(A, B, wg)
        for i, p in enumerate(group):
            if upd.A is not None:
                out.state[pairs[p][0]] = upd.A[i]
            if upd.B is not None:
                out.state[pairs[p][1]] = upd.B[i]
            if upd.delta_w is not None:
                out.delta_w[p] = upd.delta_w[i]
            out.cos[p], out.rel_err[p] = cos[i].item(), rel[i].item()
            out.cos_fedit[p], out.ceiling[p] = fedit_cos[i].item(), ceiling[i].item()
    factors = {k for ab in pairs.values() for k in ab}
    for key in keys:
        if key in factors:
            continue
        x0 = states[0][key]
        if x0.is_floating_point():
            ct = torch.promote_types(x0.dtype, torch.float32)
            stacked = torch.stack([s[key] for s in states]).to(ct)                   # (K, ...)
            out.state[key] = torch.tensordot(w.to(x0.device, ct), stacked, dims=1).to(x0.dtype)
        else:
            if any(not torch.equal(s[key], x0) for s in states):
                raise ValueError(f"{key}: non-floating entry differs across clients; cannot average it")
            out.state[key] = x0.clone()
    return out
