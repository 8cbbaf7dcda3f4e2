"""Aggregate whole client state dicts: find the LoRA pairs by name, stack same-shape layers, run
one method of aggregators.py per stack, FedAvg everything else; and measure, per layer, how far
each method's result is from the ideal update dW (`diagnostics`, `bias_bounds`, `eq8_from_factors`).

Keys as this project, HF PEFT's saved adapters and a live PEFT model write them:

    <prefix>.lora_A.weight  (r, d_in)            <prefix>.lora_B.weight  (d_out, r)
    <prefix>.lora_A.<adapter>.weight             <prefix>.lora_B.<adapter>.weight

This file and aggregators.py depend on torch and the standard library only; copy both.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from aggregators import Update, check_weights, get_aggregator, lorafair_groups, stacked_factors, weighted_mean


# ----------------------------------------------------------------------------- how far from dW

def applied_update(update: Update, A: Tensor, B: Tensor, w: Tensor) -> Tensor:
    """What the global model's adapter product becomes, B A + delta_w: (..., d_out, d_in).

    A factor the method leaves to the clients (None) is taken as its plain average, which is what
    FedSA's B_bar would be and what FLoRA's re-initialised B = 0 contributes nothing to.
    """
    if update.A is None and update.B is None:
        out = torch.zeros_like(update.delta_w)
    else:
        A_g = update.A if update.A is not None else weighted_mean(A, w)
        B_g = update.B if update.B is not None else weighted_mean(B, w)
        out = B_g @ A_g
    return out if update.delta_w is None else out + update.delta_w


def bias_bounds(A: Tensor, B: Tensor, w, *, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """FedIT's cos(dW, B_bar A_bar) and the ceiling of every method that keeps A_bar and refines B:

        max_{B'} cos(dW, B' A_bar) = ||dW P||_F / ||dW||_F,   P = A_bar^T (A_bar A_bar^T)^+ A_bar,

    the projection onto A_bar's row space (B' A_bar has its rows there, so <dW, B' A_bar> =
    <dW P, B' A_bar> <= ||dW P|| ||B' A_bar||; equality at B' = C G^+). From the factors:
    C = dW A_bar^T = U (V A_bar^T), G = A_bar A_bar^T, ||dW P||^2 = sum((C G^+) * C). LoRA-FAIR's
    Eq. 8 cannot beat the ceiling; how far FedIT is below it is what it can correct at all.
    In float64; two (...,) tensors.
    """
    A, B = A.detach().double(), B.detach().double()
    w = torch.as_tensor(w).to(A.device, torch.float64)
    A_bar, B_bar = weighted_mean(A, w), weighted_mean(B, w)
    U, V = stacked_factors(A, B, w)                                          # U: (..., d_out, K r)
    C = U @ (V @ A_bar.mT)                                                    # (..., d_out, r)
    G = A_bar @ A_bar.mT                                                      # (..., r, r)
    nX = ((U.mT @ U) * (V @ V.mT)).sum((-2, -1)).clamp_min(0).sqrt().clamp_min(eps)
    nY = ((B_bar @ G) * B_bar).sum((-2, -1)).clamp_min(0).sqrt().clamp_min(eps)
    fedit_cos = (B_bar * C).sum((-2, -1)) / (nX * nY)
    ceiling = ((C @ torch.linalg.pinv(G, hermitian=True)) * C).sum((-2, -1)).clamp_min(0).sqrt() / nX
    return fedit_cos, ceiling.clamp(max=1.0)


def diagnostics(update: Update, A: Tensor, B: Tensor, w, *, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """cos(dW, dW_applied), ||dW - dW_applied||_F / ||dW||_F and ||dW_applied||_F / ||dW||_F per
    layer: three (...,) tensors. Where the method returns no dense delta_w, from the factors alone
    (dW = U V, dW_applied = B_g A_g: <X, Y> = sum((U^T B_g) * (V A_g^T)), norms alike, in float64);
    where it does, densely one layer at a time. Never a dense tensor for a whole stack of layers
    (the 64 gate and up projections of a 7B model would be 10.8 GiB a tensor)."""
    if update.delta_w is None:
        A, B = A.detach().double(), B.detach().double()
        w = torch.as_tensor(w).to(A.device, torch.float64)
        A_g = update.A.double() if update.A is not None else weighted_mean(A, w)
        B_g = update.B.double() if update.B is not None else weighted_mean(B, w)
        U, V = stacked_factors(A, B, w)                                       # (..., d_out, K r), (..., K r, d_in)
        inner = lambda P, Q, R, S: ((P.mT @ R) * (Q @ S.mT)).sum((-2, -1))  # noqa: E731  <P Q, R S>
        xx, yy, xy = inner(U, V, U, V), inner(B_g, A_g, B_g, A_g), inner(U, V, B_g, A_g)
        nX, nY = xx.clamp_min(0).sqrt().clamp_min(eps), yy.clamp_min(0).sqrt()
        ct = torch.promote_types(A.dtype, torch.float32)
        return tuple(x.to(ct) for x in (xy / (nX * nY.clamp_min(eps)), (xx + yy - 2 * xy).clamp_min(0).sqrt() / nX,
                                        nY / nX))
    ct = torch.promote_types(A.dtype, torch.float32)                         # half precision: in float32
    lead = A.shape[:-3]
    flat = lambda x: None if x is None else x.reshape(-1, *x.shape[len(lead):])   # noqa: E731  (n, ...)
    A, B, upd = flat(A), flat(B), Update(*(flat(x) for x in update))
    w = torch.as_tensor(w).to(A.device, ct)
    out = torch.empty(3, A.shape[0], dtype=ct, device=A.device)              # (3, n layers)
    for i in range(A.shape[0]):
        Ai, Bi = A[i].to(ct), B[i].to(ct)                                     # (K, r, d_in), (K, d_out, r)
        U, V = stacked_factors(Ai, Bi, w)
        dW = U @ V                                                            # (d_out, d_in): this layer only
        applied = applied_update(Update(*(None if x is None else x[i].to(ct) for x in upd)), Ai, Bi, w)
        nX = dW.norm().clamp_min(eps)
        nY = applied.norm().clamp_min(eps)
        out[0, i], out[1, i], out[2, i] = (dW * applied).sum() / (nX * nY), (dW - applied).norm() / nX, applied.norm() / nX
        del dW, applied
    return tuple(x.reshape(lead) for x in out)


def eq8_from_factors(update: Update, A: Tensor, B: Tensor, w, lam: float) -> tuple[Tensor, Tensor]:
    """LoRA-FAIR's Eq. 8 as written (flat cosine, squared residual), in float64, per layer: at
    dB = 0, 1 - cos(dW, B_bar A_bar), and at the update, 1 - cos(dW, B' A') + lam (||B' - B_bar||^2
    + ||A' - A_bar||^2) (A' = A_bar unless the residual is on A). Two (...,) tensors. From the
    factors, dW = U V: <dW, Y A'> = sum((U^T Y) * (V A'^T)), ||Y A'||^2 = sum((Y^T Y) * (A' A'^T)),
    so nothing d_out x d_in is formed (this runs every LoRA-FAIR round). Checked against the plain
    dense statement, aggregators.eq8_objective (tests/test_states.py)."""
    A, B = A.detach().double(), B.detach().double()
    w = torch.as_tensor(w).to(A.device, torch.float64)
    A_bar, B_bar = weighted_mean(A, w), weighted_mean(B, w)
    U, V = stacked_factors(A, B, w)                                           # U: (..., d_out, K r)
    nX = ((U.mT @ U) * (V @ V.mT)).sum((-2, -1)).clamp_min(0).sqrt()          # ||dW||: (...,)
    A_new, B_new = update.A.double(), update.B.double()

    def cos(Y: Tensor, Ap: Tensor) -> Tensor:                                  # cos(dW, Y Ap)
        inner = ((U.mT @ Y) * (V @ Ap.mT)).sum((-2, -1))
        nY = ((Y.mT @ Y) * (Ap @ Ap.mT)).sum((-2, -1)).clamp_min(0).sqrt()
        return inner / (nX * nY).clamp_min(1e-300)
    residual = (B_new - B_bar).square().sum((-2, -1)) + (A_new - A_bar).square().sum((-2, -1))
    return 1 - cos(B_bar, A_bar), 1 - cos(B_new, A_new) + lam * residual


# ----------------------------------------------------------------------------- state dicts

class StateUpdate(NamedTuple):
    state: dict[str, Tensor]    # new global adapter keys (where the method returns them) and the rest, FedAvg'd
    delta_w: dict[str, Tensor]  # layer prefix -> delta_w to fold into that layer's base weight
    cos: dict[str, float]       # layer prefix -> cos(dW, dW_applied)
    rel_err: dict[str, float]   # layer prefix -> ||dW - dW_applied|| / ||dW||
    cos_fedit: dict[str, float]  # layer prefix -> FedIT's cos(dW, B_bar A_bar), the bias before any fix
    ceiling: dict[str, float]   # layer prefix -> max over B' of cos(dW, B' A_bar) (aggregators.bias_bounds)
    scale: dict[str, float]     # layer prefix -> ||dW_applied|| / ||dW|| (LoRA-FAIR: ||B' A_bar|| / ||dW||)
    eq8: dict[str, tuple[float, float]]   # lorafair: layer prefix -> Eq. 8's objective at dB = 0, at its dB


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


# methods that keep the global adapter slot by slot (row i of A, column i of B); the others
# re-factorise dW (flexlora) or restart LoRA every round (flora, florist)
PER_SLOT = ("fedit", "ffa", "fedex", "fedsa", "rolora", "lorafair", "hetlora", "rbla")


def frozen_factor(method: str, phase: Optional[str] = None) -> Optional[str]:
    """The factor a method's clients do not train: 'A' (FFA-LoRA; RoLoRA's phase 'B'), 'B'
    (RoLoRA's phase 'A') or None."""
    if method == "ffa":
        return "A"
    if method == "rolora":
        return {"A": "B", "B": "A"}[phase]
    return None


def keep_unheld(new: Mapping[str, Tensor], previous: Mapping[str, Tensor], method: str,
                ranks: Optional[Sequence[int]] = None, phase: Optional[str] = None) -> dict[str, Tensor]:
    """The new global state with what no client of the round trained kept from `previous`:

    - the frozen factor (`frozen_factor`) is the previous global one, never a client's copy, which
      is zero past that client's rank;
    - for PER_SLOT methods, with `ranks` (the round's clients'), the slots i >= max(ranks) that no
      client holds keep their previous rows of A and columns of B. The aggregators see them as
      zero padding in every client and return zeros there, and a slot zero in both A and B has
      zero gradients: it would never train again, whoever takes part later.
    Keys as in aggregate_states; `new` may lack a factor (FedSA's B): it is left out."""
    out = dict(new)
    side = frozen_factor(method, phase)
    held = None if ranks is None else max(int(r) for r in ranks)
    for ka, kb in lora_pairs(list(previous)).values():
        if side is not None:
            key = ka if side == "A" else kb
            out[key] = previous[key]
        R = previous[ka].shape[0]
        if held is not None and held < R and method in PER_SLOT:
            if ka in out:                                                     # A: (R, d_in)
                out[ka] = torch.cat([out[ka][:held], previous[ka][held:]])
            if kb in out:                                                     # B: (d_out, R)
                out[kb] = torch.cat([out[kb][:, :held], previous[kb][:, held:]], dim=1)
    return out


def pad_ranks(states: Sequence[Mapping[str, Tensor]], rank: Optional[int] = None
              ) -> tuple[list[dict[str, Tensor]], list[int]]:
    """Client states of different LoRA ranks (PEFT adapters of rank r_k, one rank per client) as
    one rank R (`rank`: the global adapter's; default the largest r_k): each A (r_k, d_in) gets zero
    rows, each B (d_out, r_k) zero columns, up to R. Returns (the padded states, [r_k]); pass them
    to aggregate_states with ranks=[r_k] (and previous= the global state), and hand client k back
    `at_rank(new.state, r_k)`. The zero padding adds nothing to any B_k A_k. Clients must share one
    scaling alpha_k / r_k (else fold s_k / s_G into B_k first, aggregators.rescaled); a client whose
    layers have different ranks is refused."""
    ranks = []
    for k, s in enumerate(states):
        mine = {s[ka].shape[0] for ka, _ in lora_pairs(list(s)).values()}
        if len(mine) != 1:
            raise ValueError(f"client {k}: " + (f"its layers have ranks {sorted(mine)}; pad_ranks takes one rank per "
                             "client (aggregate such clients' layers group by group)" if mine else "no LoRA layer"))
        ranks.append(mine.pop())
    R = max(ranks) if rank is None else rank
    if R < max(ranks):
        raise ValueError(f"rank {R} is below client {ranks.index(max(ranks))}'s rank {max(ranks)}")
    padded = []
    for s, r in zip(states, ranks):
        out = dict(s)
        for ka, kb in lora_pairs(list(s)).values():
            out[ka] = torch.cat([s[ka], s[ka].new_zeros(R - r, s[ka].shape[1])])          # (R, d_in)
            out[kb] = torch.cat([s[kb], s[kb].new_zeros(s[kb].shape[0], R - r)], dim=1)   # (d_out, R)
        padded.append(out)
    return padded, ranks


def at_rank(state: Mapping[str, Tensor], r: int) -> dict[str, Tensor]:
    """A global state cut to a rank-r client: the leading r rows of every A, columns of every B (a
    state may lack a factor, as FedSA's result lacks B)."""
    out = dict(state)
    for key, x in state.items():
        m = _lora_key(key)
        if m is not None:
            R = x.shape[0] if m[1] == "A" else x.shape[1]
            if r > R:
                raise ValueError(f"{key} has rank {R}, below the {r} asked; pad the state first (pad_ranks)")
            out[key] = (x[:r] if m[1] == "A" else x[:, :r]).clone()
    return out


def aggregate_states(states: Sequence[Mapping[str, Tensor]], weights, method: str,
                     previous: Optional[Mapping[str, Tensor]] = None, *, diagnose: bool = True,
                     **options) -> StateUpdate:
    """Aggregate whole client state dicts with one method.

    LoRA factors are found by name: `<prefix>.lora_A.weight` / `<prefix>.lora_B.weight` (this
    project and HF PEFT's saved adapters, `get_peft_model_state_dict`) or
    `<prefix>.lora_A.<adapter>.weight` (a PEFT model's own `state_dict()`); the result uses the
    same keys. Layers of the same shape are stacked into one batched call of the method; every
    other floating key (e.g. the classifier head) is FedAvg'd, sum_k p_k x_k; non-floating keys
    must agree across clients and are copied. A state with no LoRA pair at all is an error (it
    would otherwise be averaged as FedAvg, whatever the method).

    frlora takes init= its initial adapter (aggregators.frlora_init), keyed as the states.
    previous: the global state the round started from. Given, what no client trained is kept from
    it (`keep_unheld`: the frozen factor, and with heterogeneous `ranks` the slots no client holds);
    without it, those come back as the aggregators return them (zeros past the largest rank).
    diagnose=False leaves the per-layer measurements (cos, rel_err, ...) empty: at 7B scale they
    take most of a round's time (bench/README.md, "Language-model scale").
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

    def stack(group: list[str]) -> tuple:       # one shape group's copy of the factors at a time
        A = torch.stack([s[pairs[p][0]] for p in group for s in states]).unflatten(0, (len(group), K))
        B = torch.stack([s[pairs[p][1]] for p in group for s in states]).unflatten(0, (len(group), K))
        return group, A, B, w.to(A.device)                                    # A: (L, K, r, d_in)  B: (L, K, d_out, r)

    if method == "frlora":                      # its initial factors, keyed as the states, stacked as A and B
        options = dict(options)
        init = options.pop("init", None)
        if init is None or any(k not in init for ab in pairs.values() for k in ab):
            raise ValueError("frlora needs init= the initial adapter (aggregators.frlora_init), keyed as the states")

        frlora = fn

        def fn(A: Tensor, B: Tensor, w: Tensor, layer: list[str], **o) -> Update:   # frlora, given the group's init
            return frlora(A, B, w, layer=layer, A_init=torch.stack([init[pairs[p][0]] for p in layer]).to(A.device),
                          B_init=torch.stack([init[pairs[p][1]] for p in layer]).to(B.device), **o)

    def group_by_group():
        for group in groups.values():
            item = stack(group)
            yield item, fn(*item[1:], layer=group, **options)
            del item                            # this group's stack is freed before the next is made

    if method == "lorafair" and options.get("solver") == "sgd":   # one SGD loop over all groups: all at once
        stacks = [stack(group) for group in groups.values()]
        results = zip(stacks, lorafair_groups(stacks, **options))
    else:
        results = group_by_group()

    out = StateUpdate({}, {}, {}, {}, {}, {}, {}, {})
    for (group, A, B, wg), upd in results:
        for i, p in enumerate(group):           # measured layer by layer: float64 copies of one layer's factors
            one = Update(*(None if x is None else x[i] for x in upd))
            if one.A is not None:
                out.state[pairs[p][0]] = one.A
            if one.B is not None:
                out.state[pairs[p][1]] = one.B
            if one.delta_w is not None:
                out.delta_w[p] = one.delta_w
            if not diagnose:
                continue
            out.cos[p], out.rel_err[p], out.scale[p] = (x.item() for x in diagnostics(one, A[i], B[i], wg))
            out.cos_fedit[p], out.ceiling[p] = (x.item() for x in bias_bounds(A[i], B[i], wg))
            if method == "lorafair":
                out.eq8[p] = tuple(x.item() for x in eq8_from_factors(one, A[i], B[i], wg, options.get("lam", 0.01)))
        del A, B, upd, one                      # the loop's last references to this group's stack
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
    if previous is not None:
        out.state.update(keep_unheld(out.state, previous, method, options.get("ranks"), options.get("phase")))
    return out
