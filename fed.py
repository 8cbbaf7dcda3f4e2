"""One federated round, as in Algorithm 1 of the LoRA-FAIR paper, for every method.

One frozen backbone is shared by all clients. A client is its data, its weight n_k and the
per-client adapter state its method keeps (FedSA's own B): memory grows with the number of
clients by adapter size only. A round:

  1. sample the participants (a fraction of the clients, seeded by the round);
  2. each participant starts from the global adapter (method-specific, see `start_client`),
     trains locally with SGD and uploads its trainable tensors (A_k, B_k, head) and n_k;
  3. the server weights p_k = n_k / sum n_j over participants with finite updates, applies the
     method from aggregators.py (FedAvg for the head) and folds delta_w into W0 where the method
     does (FLoRA, FedEx-LoRA, FLoRIST); a rank slot no participant holds keeps its global value;
  4. it logs cos(dW, dW_applied), ||dW - dW_applied|| / ||dW|| and ||dW_applied|| / ||dW||,
     averaged over layers, and per layer next to FedIT's cosine and the ceiling of any refined B
     (states.bias_bounds); for LoRA-FAIR also Eq. 8's objective at dB = 0 and at its dB.

An image that exists but cannot be decoded arrives with label -1 (data.ImageList): it is left out
of the loss and of accuracy, and counted once per domain (`unreadable()`).
"""
from __future__ import annotations

import bisect
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from aggregators import weighted_mean
from states import aggregate_states, keep_unheld
from data import DataError, DomainData
from lora import fold_into_base, load_lora_state, lora_layers, reset_lora, trainable_state

FOLDS = ("flora", "fedex", "florist")         # fold an update into W0 every round
RESTARTS = ("flora", "florist")               # clients start every round from a fresh LoRA (A random, B = 0)


class Diverged(RuntimeError):
    """Every client's update of a round was NaN/Inf: training diverged (train.py: exit code 3)."""


@dataclass
class FedConfig:
    method: str = "lorafair"
    lr: float = 0.01              # client SGD (paper); momentum, weight decay, clip: derived code
    momentum: float = 0.9
    weight_decay: float = 1e-5
    clip: float = 10.0
    batch_size: int = 128
    local_epochs: int = 1
    local_steps: Optional[int] = None   # cap on local steps per round (None: whole epochs)
    participation: float = 1.0          # fraction of clients sampled per round
    seed: int = 0
    amp: bool = False                   # bf16 autocast (on the run's device; changes the arithmetic)
    workers: int = 0
    client_init: str = "global"         # clients start each round from: the global adapter | a fresh
                                        # LoRA (global adapter folded into W0 first) | their own last one
    local_head: bool = False            # fedsa: each client also keeps its own classifier head
    agg_options: dict = field(default_factory=dict)   # the method's options, e.g. lorafair's steps, lr, lam
    progress: bool = True


@dataclass
class Client:
    domain: int                  # index into the domains; -1: all domains' data (the centralised reference)
    indices: list[int]           # samples of that domain's train split (of their concatenation for -1)
    state: dict[str, Tensor] = field(default_factory=dict)   # adapters the client keeps (FedSA's B)
    rank: Optional[int] = None   # its LoRA rank r_k (None: the model's rank R); it trains the leading r_k
    scale: Optional[float] = None    # rows of A / columns of B, at its scaling s_k = alpha_k / r_k (None: the model's)

    @property
    def n(self) -> int:
        return len(self.indices)


class _Indexed(Dataset):
    """(x, y, i): a sample and its index, so that an unreadable image (y = -1) is counted once."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


def _seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash of ints is stable; of tuples too)."""
    return hash(tuple(parts)) & (2**63 - 1)


class Federation:
    """The server and its clients around one model (backbone frozen, LoRA injected, head new)."""

    def __init__(self, model: nn.Module, domains: list[DomainData], clients: list[Client], cfg: FedConfig,
                 device: torch.device, rank: int = 0, world: int = 1):
        self.model, self.domains, self.clients, self.cfg, self.device = model, domains, clients, cfg, device
        self.rank, self.world = rank, world              # torch.distributed: this process trains chosen[rank::world]
        self.round = 0                                   # rounds completed
        keys = list(trainable_state(model))
        self.a_keys = [k for k in keys if k.endswith("lora_A.weight")]
        self.b_keys = [k for k in keys if k.endswith("lora_B.weight")]
        self.head_keys = [k for k in keys if k not in self.a_keys and k not in self.b_keys]
        first = next(iter(lora_layers(model).values()), None)
        self.R, self.scale = (first[0].r, first[0].scaling) if first else (None, None)   # global rank, s_G
        for c in clients:
            if c.rank is not None and not 1 <= c.rank <= self.R:
                raise ValueError(f"client rank {c.rank} must be in 1..{self.R} (the model's LoRA rank)")
        # FedSA-LoRA: a client's own B (and head, local_head) as initialised, which a client drawn
        # for the first time starts from (each client owns a model in the authors' per-client mode)
        own = self.b_keys + (self.head_keys if cfg.local_head else [])
        self.own_init = {k: v for k, v in trainable_state(model).items() if k in own} if cfg.method == "fedsa" else {}
        self.unreadable_train = {d.name: set() for d in domains}   # indices into each domain's train split
        self.unreadable_test = {d.name: 0 for d in domains}         # found by the last evaluation

    # ------------------------------------------------------------------ client side

    def set_trainable_factors(self, phase: Optional[str]) -> None:
        """FFA-LoRA freezes A for the whole run; RoLoRA trains only this round's factor."""
        params = dict(self.model.named_parameters())
        train_A = self.cfg.method != "ffa" and phase != "B"
        train_B = phase != "A"
        for k in self.a_keys:
            params[k].requires_grad_(train_A)
        for k in self.b_keys:
            params[k].requires_grad_(train_B)

    def heterogeneous(self, client: Client) -> bool:
        return (client.rank or self.R) != self.R or (client.scale or self.scale) != self.scale

    def trained(self, phase: Optional[str]) -> list[str]:
        """The factor that carries a client's scaling (its own units): A in RoLoRA's phase 'A', else B."""
        return self.a_keys if phase == "A" else self.b_keys

    @torch.no_grad()
    def start_client(self, client: Client, glob: dict[str, Tensor], phase: Optional[str] = None) -> None:
        """Every method starts from the global adapter and head; FedSA swaps in the client's own B
        (its initial B the first time it is drawn), client_init='local' the client's whole last adapter. A client of rank r_k takes the leading
        r_k rows of A and columns of B, and the factor it trains divided by s_k / s_G, so that its
        adapter, at its own scaling s_k, adds what the global one does (aggregators.client_factors)."""
        load_lora_state(self.model, glob)
        if self.heterogeneous(client):
            params, r = dict(self.model.named_parameters()), client.rank or self.R
            for k in self.a_keys:
                params[k][r:] = 0
            for k in self.b_keys:
                params[k][:, r:] = 0
            for k in self.trained(phase):
                params[k].mul_(self.scale / (client.scale or self.scale))
        if client.state:
            load_lora_state(self.model, client.state)
        elif self.own_init:                     # FedSA, first time drawn: its own initial B, not B_bar
            load_lora_state(self.model, self.own_init)
        self.set_scaling(client.scale or self.scale)

    @torch.no_grad()
    def adapter_products(self) -> dict[str, Tensor]:
        """B A of every adapter (B @ A units), what client_init='fresh' folds into W0."""
        return {p: lora.lora_B.weight @ lora.lora_A.weight for p, (lora, _, _) in lora_layers(self.model).items()}

    def set_scaling(self, s: float) -> None:
        for lora, _, _ in lora_layers(self.model).values():
            lora.scaling = s

    def to_global_units(self, client: Client, upload: dict[str, Tensor], phase: Optional[str]) -> dict[str, Tensor]:
        """A client's upload with its scaling folded into the trained factor (weight units of s_G)."""
        if not self.heterogeneous(client):
            return upload
        ratio = (client.scale or self.scale) / self.scale
        return {k: v * ratio if k in self.trained(phase) else v for k, v in upload.items()}

    def train_set(self, client: Client):
        if client.domain < 0:
            return ConcatDataset([d.train for d in self.domains])
        return self.domains[client.domain].train

    def local_train(self, client: Client, seed: int) -> float:
        """Local SGD on the client's data; returns the mean loss. No host syncs inside the loop."""
        cfg, model = self.cfg, self.model
        torch.manual_seed(seed)                                          # dropout
        g = torch.Generator().manual_seed(seed)                          # shuffling
        cuda = self.device.type == "cuda"
        loader = DataLoader(Subset(_Indexed(self.train_set(client)), client.indices), batch_size=cfg.batch_size,
                            shuffle=True, generator=g, num_workers=cfg.workers, pin_memory=cuda,
                            persistent_workers=cfg.workers > 0)   # one worker pool for all epochs
        params = [p for p in model.parameters() if p.requires_grad]
        masks = []                                                       # (param, 0/1 mask) for r_k < R
        if client.rank is not None and client.rank < self.R:
            named, r = dict(model.named_parameters()), client.rank
            masks = [(named[k], (torch.arange(self.R, device=self.device) < r).to(named[k])[:, None])
                     for k in self.a_keys if named[k].requires_grad]
            masks += [(named[k], (torch.arange(self.R, device=self.device) < r).to(named[k])[None, :])
                      for k in self.b_keys if named[k].requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        steps_per_epoch = len(loader)
        total = cfg.local_epochs * steps_per_epoch
        if cfg.local_steps:
            total = cfg.local_steps if cfg.local_epochs <= 0 else min(total, cfg.local_steps)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()
        loss_sum = torch.zeros((), device=self.device)
        unreadable = []                                                  # sample indices with y = -1
        model.train()
        step = 0
        name = self.domains[client.domain].name if client.domain >= 0 else "all"
        bar = tqdm(total=total, desc=f"  client (domain {name})", leave=False,
                   disable=not cfg.progress)
        while step < total:
            for x, y, i in loader:
                unreadable.append(i[y < 0])
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with amp:
                    logits = model(x)
                valid = (y >= 0).sum()
                loss = F.cross_entropy(logits.float(), y, ignore_index=-1, reduction="sum") / valid.clamp_min(1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, keep in masks:                                    # rank r_k: padding stays zero
                    p.grad.mul_(keep)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                loss_sum += loss.detach()
                step += 1
                bar.update()
                if step >= total:
                    break
        bar.close()
        self._note_unreadable(client, torch.cat(unreadable).tolist() if unreadable else [])
        return (loss_sum / max(step, 1)).item()

    def _note_unreadable(self, client: Client, indices: list[int]) -> None:
        """Record unreadable training images; `indices` index the client's train set (for the
        centralised client, the concatenation of every domain's)."""
        if client.domain >= 0:
            self.unreadable_train[self.domains[client.domain].name].update(indices)
            return
        ends = ConcatDataset([d.train for d in self.domains]).cumulative_sizes
        for i in indices:
            d = bisect.bisect_right(ends, i)
            self.unreadable_train[self.domains[d].name].add(i - (ends[d - 1] if d else 0))

    def share_unreadable(self) -> None:
        """torch.distributed: every process learns the unreadable images the others met. Plain
        tensor all_gathers (sizes, then padded indices into the concatenated train sets)."""
        ends = ConcatDataset([d.train for d in self.domains]).cumulative_sizes
        mine = torch.tensor([(ends[d - 1] if d else 0) + i for d, dom in enumerate(self.domains)
                             for i in sorted(self.unreadable_train[dom.name])], dtype=torch.long)
        n = torch.tensor([len(mine)], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        rows = torch.full((max(1, max(int(s) for s in sizes)),), -1, dtype=torch.long, device=self.device)
        rows[:len(mine)] = mine.to(self.device)
        gathered = [torch.empty_like(rows) for _ in range(self.world)]
        dist.all_gather(gathered, rows)
        everyone = torch.cat(gathered)
        self._note_unreadable(Client(-1, []), everyone[everyone >= 0].tolist())

    def unreadable(self) -> dict[str, dict[str, int]]:
        """Images that exist but could not be decoded, per domain: distinct training images met so
        far and test images in the last evaluation. All are left out of the loss and of accuracy."""
        return {d: {"train": len(self.unreadable_train[d]), "test": self.unreadable_test[d]}
                for d in self.unreadable_train if self.unreadable_train[d] or self.unreadable_test[d]}

    # ------------------------------------------------------------------ server side

    def run_round(self) -> dict:
        """Round t = self.round: train the sampled clients, aggregate, update the global model."""
        chosen, phase, glob = self.begin_round()
        tic = time.perf_counter()
        results = [(k, *self.train_client(k, glob, phase))          # the clients this process trains
                   for k in chosen[self.rank::self.world]]
        if self.world > 1:
            results = self.exchange(results, len(chosen), glob)
            self.share_unreadable()
        return self.finish_round(chosen, phase, glob, results, time.perf_counter() - tic)

    def sample(self, t: int) -> list[int]:
        """The clients of round t: a fraction `participation` of them, drawn by the seed and the round."""
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, t, 1))
        m = max(1, round(self.cfg.participation * len(self.clients)))
        return sorted(torch.randperm(len(self.clients), generator=g)[:m].tolist())

    def begin_round(self) -> tuple[list[int], Optional[str], dict[str, Tensor]]:
        """Server, before training: the round's clients, RoLoRA's phase, and the global trainable
        state they start from (after client_init='fresh' has folded the adapter into W0)."""
        cfg, t = self.cfg, self.round
        phase = ("B" if t % 2 == 0 else "A") if cfg.method == "rolora" else None   # B first: A's grad is 0 at B = 0
        self.set_trainable_factors(phase)
        if cfg.client_init == "fresh" and t > 0 and cfg.method not in RESTARTS:   # these restart already
            fold_into_base(self.model, self.from_lead(self.adapter_products()))
            reset_lora(self.model, _seed(cfg.seed, t, 4))
        return self.sample(t), phase, trainable_state(self.model)

    def train_client(self, k: int, glob: dict[str, Tensor], phase: Optional[str]) -> tuple[dict[str, Tensor], float]:
        """Client k's part of round self.round: start from `glob` (its own adapter where its method
        keeps one), train locally; returns its upload (trainable tensors) and mean loss."""
        self.set_trainable_factors(phase)
        self.start_client(self.clients[k], glob, phase)
        loss = self.local_train(self.clients[k], _seed(self.cfg.seed, self.round, 2, k))
        return trainable_state(self.model), loss

    def finish_round(self, chosen: list[int], phase: Optional[str], glob: dict[str, Tensor], results: list,
                     t_train: float) -> dict:
        """Server, after training: `results` [(k, upload, loss)] of the round's clients (NaN ones and
        clients that never answered are left out, the weights renormalised over the rest), the
        method's aggregation, the new global model, and the round's record."""
        cfg, t = self.cfg, self.round
        self.set_scaling(self.scale)
        uploads, sizes, losses, bad = [], [], [], []
        dropped = [k for k in chosen if k not in {r[0] for r in results}]
        for k, up, loss in sorted(results, key=lambda x: x[0]):
            if not math.isfinite(loss) or not all(v.isfinite().all() for v in up.values()):
                bad.append(k)
                continue
            if cfg.method == "fedsa":   # its own B (and head, as FedSA-LoRA's authors run it)
                own = self.b_keys + (self.head_keys if cfg.local_head else [])
                self.clients[k].state = {key: up[key] for key in own}
            elif cfg.client_init == "local":
                self.clients[k].state = {key: up[key] for key in self.a_keys + self.b_keys}
            uploads.append(self.to_global_units(self.clients[k], up, phase))
            sizes.append(self.clients[k].n)
            losses.append(loss)
        if uploads and bad and self.rank == 0:
            warnings.warn(f"round {t + 1}: the updates of clients {bad} are NaN/Inf; left out of this round")
        dropped = sorted(dropped + bad)
        if not uploads:
            raise Diverged(f"round {t + 1}: every client's update was NaN/Inf, so training diverged; "
                           f"lower the client lr (--lr {cfg.lr:g})")

        tic = time.perf_counter()
        w = torch.tensor(sizes, dtype=torch.float64)
        w = w / w.sum()
        options = dict(cfg.agg_options)
        if cfg.method == "lorafair" and options.get("init") == "xavier":
            options["seed"] = _seed(cfg.seed, t, 3)
        if cfg.method == "rolora":
            options["phase"] = phase
        kept = [k for k in chosen if k not in dropped]
        if any((self.clients[k].rank or self.R) != self.R for k in kept):
            options["ranks"] = [self.clients[k].rank or self.R for k in kept]
        agg = aggregate_states(uploads, w, cfg.method, **options)
        new = dict(glob)
        new.update(agg.state)
        if cfg.method == "fedsa":   # the global B (for global evaluation) is B_bar; clients keep their own
            for key in self.b_keys:
                new[key] = weighted_mean(torch.stack([u[key] for u in uploads]), w.to(uploads[0][key]))
        # what no client trained keeps its global value: frozen factors, unheld rank slots (states.py)
        new = keep_unheld(new, glob, cfg.method, [self.clients[k].rank or self.R for k in kept], phase)
        new = self.from_lead({key: new[key] for key in glob})    # rank 0's result everywhere, folds too,
        load_lora_state(self.model, new)                         # so last-bit differences never accumulate
        if agg.delta_w:
            fold_into_base(self.model, self.from_lead(agg.delta_w))
        if cfg.method in RESTARTS:   # fresh LoRA for next round, the same on every client
            reset_lora(self.model, _seed(cfg.seed, t + 1, 4))
        t_agg = time.perf_counter() - tic
        self.round += 1
        return {"round": self.round, "clients": [k for k in chosen if k not in dropped], "dropped": dropped,
                "bytes": self.wire_bytes(uploads[0], [self.clients[k].rank or self.R for k in kept], phase,
                                         agg.delta_w),
                "train_loss": sum(losses) / len(losses),
                "cos": sum(agg.cos.values()) / len(agg.cos),
                "rel_err": sum(agg.rel_err.values()) / len(agg.rel_err),
                "cos_fedit": sum(agg.cos_fedit.values()) / len(agg.cos_fedit),   # FedIT's, same inputs
                "ceiling": sum(agg.ceiling.values()) / len(agg.ceiling),         # best any B' on A_bar reaches
                "scale": sum(agg.scale.values()) / len(agg.scale),               # ||dW_applied|| / ||dW||
                **({"eq8_0": sum(v[0] for v in agg.eq8.values()) / len(agg.eq8),   # LoRA-FAIR: Eq. 8 at dB = 0
                    "eq8": sum(v[1] for v in agg.eq8.values()) / len(agg.eq8)} if agg.eq8 else {}),   # at its dB
                "layers": {p: {"cos": agg.cos[p], "cos_fedit": agg.cos_fedit[p], "ceiling": agg.ceiling[p],
                               "scale": agg.scale[p],
                               **({"eq8_0": agg.eq8[p][0], "eq8": agg.eq8[p][1]} if p in agg.eq8 else {})}
                           for p in agg.cos},
                "seconds": {"train": t_train, "aggregate": t_agg}}

    @property
    def folds(self) -> bool:
        """Whether this run changes the backbone's weights (FLoRA, FedEx-LoRA, FLoRIST, client_init='fresh')."""
        return self.cfg.method in FOLDS or self.cfg.client_init == "fresh"

    def from_lead(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """torch.distributed: rank 0's values of `tensors` on every process (one broadcast per dtype),
        so what changes the model (the new adapter, a fold into W0) comes from one source even
        where processes would round differently (mixed hardware). One process: `tensors` as given."""
        if self.world == 1 or not tensors:
            return tensors
        out = {}
        for dt in sorted({v.dtype for v in tensors.values()}, key=str):
            ks = [k for k, v in tensors.items() if v.dtype == dt]
            flat = torch.cat([tensors[k].reshape(-1) for k in ks])
            dist.broadcast(flat, src=0)
            out.update({k: x.view_as(tensors[k]) for k, x in zip(ks, flat.split([tensors[k].numel() for k in ks]))})
        return {k: out[k] for k in tensors}

    def wire_bytes(self, upload: dict[str, Tensor], ranks: list[int], phase: Optional[str],
                   delta_w: dict[str, Tensor]) -> dict[str, int]:
        """Bytes this round moves in a real deployment, summed over its K clients: 'up', what they
        upload, and 'down', what each must receive to start the next round. A client uploads and
        receives only what its method exchanges: FFA-LoRA's B (A is frozen and known), FedSA-LoRA's
        A (B stays), RoLoRA's factor of the round; the head unless it is kept local. FedEx-LoRA's
        clients also receive the dense residual they fold into W0, FLoRA's the K stacked adapters,
        FLoRIST's the rank-m factors of the update they fold.
        A client of rank r_k moves r_k of the R rows of A and columns of B."""
        method = self.cfg.method
        factor_keys = set(self.a_keys + self.b_keys)

        def size(keys, r=self.R):
            return sum(upload[k].numel() * upload[k].element_size() * (r / self.R if k in factor_keys else 1)
                       for k in keys)
        head = [] if method == "fedsa" and self.cfg.local_head else self.head_keys
        factors = {"ffa": self.b_keys, "fedsa": self.a_keys,
                   "rolora": self.a_keys if phase == "A" else self.b_keys}.get(method, self.a_keys + self.b_keys)
        up = down = sum(size(factors + head, r) for r in ranks)      # each client receives what it sends
        if method == "fedex":
            down += len(ranks) * sum(d.numel() * d.element_size() for d in delta_w.values())
        if method == "flora":
            down = len(ranks) * (sum(size(self.a_keys + self.b_keys, r) for r in ranks) + size(head))
        if method == "florist":   # the truncated factors U_m S_m, V_m^T of each layer, m = rank(delta_w),
            # counting components above max(d) eps (of delta_w's dtype) times the largest: its rounding
            # noise stays below that, and a smaller kept component carries nothing at that precision
            per = sum(int(torch.linalg.matrix_rank(d.float(), rtol=max(d.shape) * torch.finfo(d.dtype).eps))
                      * sum(d.shape) * upload[self.b_keys[0]].element_size() for d in delta_w.values())
            down = len(ranks) * (per + size(head))
        return {"up": int(up), "down": int(down)}

    def exchange(self, results: list, m: int, like: dict[str, Tensor]) -> list:
        """all_gather every process's (k, upload, loss): the client index and loss as one float64
        row (exact for any index below 2^53), the upload as one row per dtype of its tensors, so a
        bf16 model sends bf16 and nothing is rounded on the way.

        Only LoRA factors and heads (the trainable tensors) and the client index cross the wire; the
        client sizes n_k are known to every process already. Rows are padded to the largest share.
        Every received tensor is copied out of the gathered buffer, so a client's stored state owns
        its memory (a view would keep the whole round's buffer alive).
        """
        per = -(-m // self.world)                                            # ceil(m / world)
        keys = list(like)
        dtypes = sorted({v.dtype for v in like.values()}, key=str)
        groups = {dt: [key for key in keys if like[key].dtype == dt] for dt in dtypes}
        meta = torch.full((per, 2), -1.0, device=self.device, dtype=torch.float64)   # (per, 2): k, loss; k = -1 pads
        rows = {dt: torch.zeros(per, sum(like[key].numel() for key in ks), device=self.device, dtype=dt)
                for dt, ks in groups.items()}                                # per dtype: (per, P_dtype)
        for i, (k, up, loss) in enumerate(results):
            meta[i, 0], meta[i, 1] = k, loss
            for dt, ks in groups.items():
                rows[dt][i] = torch.cat([up[key].reshape(-1) for key in ks])

        def gather(x: Tensor) -> Tensor:
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x)
            return torch.cat(parts)
        meta = gather(meta).cpu()
        rows = {dt: gather(x) for dt, x in rows.items()}
        out = []
        for j, (k, loss) in enumerate(meta.tolist()):
            if k < 0:
                continue
            up = {}
            for dt, ks in groups.items():
                parts = rows[dt][j].split([like[key].numel() for key in ks])
                up.update({key: p.view(like[key].shape).clone() for key, p in zip(ks, parts)})
            out.append((int(k), {key: up[key] for key in keys}, loss))
        return out

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def counts(self, dataset) -> tuple[int, int, int]:
        """(correct, readable, unreadable) top-1 counts of the current model on `dataset`."""
        cuda = self.device.type == "cuda"
        loader = DataLoader(dataset, batch_size=max(self.cfg.batch_size, 256), num_workers=self.cfg.workers,
                            pin_memory=cuda)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.amp else nullcontext()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        n = bad = 0
        self.model.eval()
        for x, y in loader:
            bad += int((y < 0).sum())                    # y is still on the CPU: no device sync
            n += len(y)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with amp:
                correct += (self.model(x).argmax(-1) == y).sum()   # y = -1 never matches
        return int(correct), n - bad, bad

    def evaluate(self) -> dict[str, float]:
        """Top-1 of the global model on each domain's test split, and their mean (the paper's metric).

        FedSA-LoRA is personalised: a domain is scored with each of its clients' own B, averaged (a
        client never drawn yet with its initial B, the model it would start from).
        Unreadable test images are left out (not scored as wrong) and counted in `unreadable_test`.
        Under torch.distributed every process calls this: the (domain, adapter) evaluations are
        shared out round-robin and their counts summed with one all_reduce, so no process waits
        while another evaluates alone.
        """
        glob = trainable_state(self.model)
        items = []                                       # (domain index, client whose own adapter, or None)
        for d in range(len(self.domains)):
            own = [c for c in self.clients if c.domain == d] if self.cfg.method == "fedsa" else []
            items += [(d, c) for c in own] or [(d, None)]
        found = torch.zeros(len(items), 3, dtype=torch.long)                 # (items, 3): correct, readable, bad
        for i in range(self.rank, len(items), self.world):
            d, c = items[i]
            if c is not None:                        # never drawn yet: its initial B, as it would start
                load_lora_state(self.model, c.state or self.own_init)
                self.set_scaling(c.scale or self.scale)
            found[i] = torch.tensor(self.counts(self.domains[d].test))
            if c is not None:
                load_lora_state(self.model, glob)
                self.set_scaling(self.scale)
        if self.world > 1:
            found = found.to(self.device)
            dist.all_reduce(found)                                           # each row filled by one process
            found = found.cpu()
        acc = {}
        for d, dom in enumerate(self.domains):
            rows = [found[i].tolist() for i, (e, _) in enumerate(items) if e == d]
            if all(ok == 0 and bad > 0 for _, ok, bad in rows):
                raise DataError(f"every one of the {rows[0][2]} test images of {dom.name} could not be decoded; "
                                "check the image files")
            acc[dom.name] = sum(right / max(ok, 1) for right, ok, _ in rows) / len(rows)
            self.unreadable_test[dom.name] = rows[-1][2]
        acc["mean"] = sum(acc.values()) / len(self.domains)
        return acc

    # ------------------------------------------------------------------ checkpoints

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything a resumed run needs: global trainables, base weights changed by folding,
        and each client's own adapters."""
        out = {f"global/{k}": v for k, v in trainable_state(self.model).items()}
        if self.folds:
            seen = set()
            for prefix, (_, base, _) in lora_layers(self.model).items():
                if id(base) not in seen:                       # q and v share one qkv weight
                    seen.add(id(base))
                    out[f"base/{prefix}"] = base.weight.detach()
        for i, c in enumerate(self.clients):
            out.update({f"client{i}/{k}": v for k, v in c.state.items()})
        for d, s in self.unreadable_train.items():
            if s:
                out[f"unreadable/{d}"] = torch.tensor(sorted(s), dtype=torch.long)
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor], rounds_done: int) -> None:
        load_lora_state(self.model, {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")})
        layers = lora_layers(self.model)
        for k, v in tensors.items():
            if k.startswith("base/"):
                layers[k[len("base/"):]][1].weight.copy_(v)
        for i, c in enumerate(self.clients):
            p = f"client{i}/"
            c.state = {k[len(p):]: v.to(self.device) for k, v in tensors.items() if k.startswith(p)}
        for d in self.unreadable_train:
            self.unreadable_train[d] = set(tensors[f"unreadable/{d}"].tolist()) if f"unreadable/{d}" in tensors else set()
        self.round = rounds_done
