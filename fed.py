"""Federated LoRA fine-tuning, one round at a time: Algorithm 1 of the LoRA-FAIR paper, for every method.

`Federation.run_round` is Algorithm 1's loop body, for any method of aggregators.py:

  1. sample the participants S_t (a fraction of the clients, seeded by the round);
  2. each participant starts from the global adapter (`LocalTraining.start`: method-specific), trains
     locally with SGD (`local_sgd`) and uploads its trainable tensors (A_k, B_k, head) and n_k;
  3. the server weights p_k = n_k / sum n_j over participants with finite updates and applies the
     method (`aggregate`: states.aggregate_states, FedAvg for the head; a rank slot no participant
     holds keeps its global value);
  4. the new global adapter is loaded, delta_w folded into W0 where the method does (FLoRA,
     FedEx-LoRA, FLoRIST, FRLoRA), and the round's record logged (`round_record`): cos(dW, dW_applied),
     ||dW - dW_applied|| / ||dW||, ||dW_applied|| / ||dW||, FedIT's cosine and the ceiling of any
     refined B (states.bias_bounds), for LoRA-FAIR Eq. 8's objective at dB = 0 and at its dB.

One frozen backbone is shared by all clients. A client is its data, its weight n_k and the
per-client adapter state its method keeps (FedSA's own B): memory grows with the number of
clients by adapter size only. Several processes (torchrun) split a round's clients between them;
what they exchange is in exchange.py. An image that exists but cannot be decoded arrives with
label -1 (data.ImageList): it is left out of the loss and of accuracy, and counted once per domain.
"""
from __future__ import annotations

import bisect
import math
import secrets
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm.auto import tqdm

import dp
import exchange
from aggregators import weighted_mean
from states import aggregate_states, keep_unheld
from data import DataError, DomainData
from lora import fold_into_base, frlora_start, load_lora_state, lora_layers, reset_lora, trainable_state

FOLDS = ("flora", "fedex", "florist", "frlora")   # fold an update into W0 every round
RESTARTS = ("flora", "florist")               # clients start every round from a fresh LoRA (A random, B = 0)
FROZEN_A = ("ffa", "fedsvd", "frlora")        # clients train B only, on the global A


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
    dp: Optional[dp.DPConfig] = None    # DP-SGD on the clients: (epsilon, delta, clip); None: no DP
    progress: bool = True


@dataclass
class Client:
    domain: int                  # index into the domains; -1: all domains' data (the centralised reference)
    indices: list[int]           # samples of that domain's train split (of their concatenation for -1)
    state: dict[str, Tensor] = field(default_factory=dict)   # adapters the client keeps (FedSA's B)
    rank: Optional[int] = None   # its LoRA rank r_k (None: the model's rank R); it trains the leading r_k
    scale: Optional[float] = None    # rows of A / columns of B, at its scaling s_k = alpha_k / r_k (None: the model's)
    noise: Optional[float] = None    # its DP-SGD noise multiplier sigma_k (None: no DP; dp.Privacy sets it)

    @property
    def n(self) -> int:
        return len(self.indices)


class Federation:
    """The server and its clients around one model (backbone frozen, LoRA injected, head new)."""

    def __init__(self, model: nn.Module, domains: list[DomainData], clients: list[Client], cfg: FedConfig,
                 device: torch.device, rank: int = 0, world: int = 1, privacy: Optional[dp.Privacy] = None):
        self.model, self.domains, self.clients, self.cfg, self.device = model, domains, clients, cfg, device
        self.privacy = privacy                           # DP-SGD's ledger (dp.py); None: no DP
        if (cfg.dp is None) != (privacy is None) or (privacy and privacy.cfg != cfg.dp):
            raise ValueError("FedConfig.dp and the privacy ledger go together, with the same DPConfig: pass "
                             "Federation(..., privacy=plan_privacy(clients, cfg, rounds)) exactly when cfg.dp is set")
        self.set_noise()
        self.rank, self.world = rank, world              # torch.distributed: this process trains chosen[rank::world]
        self.round = 0                                   # rounds completed
        self.unreadable_images = Unreadable(domains)
        self.local = LocalTraining(model, domains, cfg, device, self.unreadable_images)   # the clients' half
        loc = self.local
        self.a_keys, self.b_keys, self.head_keys, self.R, self.scale = loc.a_keys, loc.b_keys, loc.head_keys, loc.R, loc.scale
        for c in clients:
            if c.rank is not None and not 1 <= c.rank <= self.R:
                raise ValueError(f"client rank {c.rank} must be in 1..{self.R} (the model's LoRA rank)")
        # FRLoRA: the adapter starts as W0's top-r components, W0 keeps the rest; every round restarts there
        if cfg.method == "frlora" and any((c.rank or self.R) != self.R for c in clients):
            raise ValueError("frlora is defined for one rank shared by every client (its start is W0's top-r components)")
        self.init = frlora_start(model) if cfg.method == "frlora" else {}
        if self.init and world > 1:          # rank 0's start everywhere: an SVD rounds as its hardware does
            layers = lora_layers(model)
            rest = exchange.from_lead({p: base.weight[rows].clone() for p, (_, base, rows) in layers.items()}, world)
            self.init = exchange.from_lead(self.init, world)
            with torch.no_grad():
                for p, (_, base, rows) in layers.items():
                    base.weight[rows] = rest[p]
            load_lora_state(model, self.init)

    # ------------------------------------------------------------------ Algorithm 1: one round

    def run_round(self) -> dict:
        """Round t = self.round of Algorithm 1; returns the round's record (metrics.jsonl)."""
        chosen, phase, glob = self.begin_round()                     # 1. sample S_t; the global adapter
        tic = time.perf_counter()
        results = [(k, *self.train_client(k, glob, phase))          # 2. each client starts from it and
                   for k in chosen[self.rank::self.world]]           #    trains: [(k, upload, loss)]
        if self.world > 1:                                           #    (torchrun: every process gets all)
            results = exchange.gather_uploads(results, len(chosen), glob, self.world, self.device)
            self.share_unreadable()
        return self.finish_round(chosen, phase, glob, results,       # 3. the server aggregates,
                                 time.perf_counter() - tic)          # 4. and the model takes the result

    def begin_round(self) -> tuple[list[int], Optional[str], dict[str, Tensor]]:
        """Server, before training: the round's clients, RoLoRA's phase, and the global trainable
        state they start from (after client_init='fresh' has folded the adapter into W0)."""
        cfg, t = self.cfg, self.round
        phase = ("B" if t % 2 == 0 else "A") if cfg.method == "rolora" else None   # B first: A's grad is 0 at B = 0
        self.local.set_trainable_factors(phase)
        if cfg.client_init == "fresh" and t > 0 and cfg.method not in RESTARTS:   # these restart already
            fold_into_base(self.model, exchange.from_lead(self.local.adapter_products(), self.world))
            reset_lora(self.model, _seed(cfg.seed, t, 4))
        return self.sample(t), phase, trainable_state(self.model)

    def sample(self, t: int) -> list[int]:
        """The clients of round t: a fraction `participation` of them, drawn by the seed and the round."""
        return sample_clients(len(self.clients), self.cfg.participation, self.cfg.seed, t)

    def train_client(self, k: int, glob: dict[str, Tensor], phase: Optional[str]) -> tuple[dict[str, Tensor], float]:
        """Client k's part of round self.round: start from `glob` (its own adapter where its method
        keeps one), train locally; returns its upload (trainable tensors) and mean loss."""
        self.local.set_trainable_factors(phase)
        self.local.start(self.clients[k], glob, phase)
        loss = self.local.train(self.clients[k], _seed(self.cfg.seed, self.round, 2, k))
        return trainable_state(self.model), loss

    def finish_round(self, chosen: list[int], phase: Optional[str], glob: dict[str, Tensor], results: list,
                     t_train: float) -> dict:
        """Server, after training: `results` [(k, upload, loss)] of the round's clients (NaN ones and
        clients that never answered are left out, the weights renormalised over the rest), the
        method's aggregation, the new global model, and the round's record."""
        self.local.set_scaling(self.scale)
        kept, uploads, losses, dropped = self.receive(chosen, phase, results)   # finite uploads, weight units
        for k, _, _ in results if self.privacy else ():                        # DP: every client that trained spent
            self.privacy.spend(k)
        tic = time.perf_counter()
        ranks = [self.clients[k].rank or self.R for k in kept]
        w = torch.tensor([self.clients[k].n for k in kept], dtype=torch.float64)
        agg, new = self.aggregate(uploads, w / w.sum(), ranks, phase, glob)     # p_k = n_k / sum_j n_j
        self.apply(new, agg.delta_w)                                           # new adapter, folds into W0
        t_agg = time.perf_counter() - tic
        self.round += 1
        rec = round_record(self.round, kept, dropped, losses, agg,
                           self.wire_bytes(uploads[0], ranks, phase, agg.delta_w), t_train, t_agg)
        if self.privacy:                                 # each client's epsilon spent so far, and at what
            rec["dp"] = self.privacy.report()
        return rec

    # ------------------------------------------------------------------ server side

    def receive(self, chosen: list[int], phase: Optional[str], results: list) -> tuple[list, list, list, list]:
        """The uploads the server keeps, in client order and weight units (s_G), and what each
        client keeps for itself (FedSA's own B, client_init='local''s adapter); a NaN/Inf upload is
        dropped with a warning, all of them ends the run (`Diverged`).
        Returns (kept client indices, their uploads, their losses, dropped client indices)."""
        cfg, t = self.cfg, self.round
        kept, uploads, losses, bad = [], [], [], []
        dropped = [k for k in chosen if k not in {r[0] for r in results}]
        for k, up, loss in sorted(results, key=lambda x: x[0]):
            # (under DP the server never reads a client's loss: its update decides alone)
            if (not math.isfinite(loss) and not self.privacy) or not all(v.isfinite().all() for v in up.values()):
                bad.append(k)
                continue
            if cfg.method == "fedsa":   # its own B (and head, as FedSA-LoRA's authors run it)
                own = self.b_keys + (self.head_keys if cfg.local_head else [])
                self.clients[k].state = {key: up[key] for key in own}
            elif cfg.client_init == "local":
                self.clients[k].state = {key: up[key] for key in self.a_keys + self.b_keys}
            kept.append(k)
            uploads.append(self.local.to_global_units(self.clients[k], up, phase))
            losses.append(loss)
        if uploads and bad and self.rank == 0:
            warnings.warn(f"round {t + 1}: the updates of clients {bad} are NaN/Inf; left out of this round")
        if not uploads:
            raise Diverged(f"round {t + 1}: every client's update was NaN/Inf, so training diverged; "
                           f"lower the client lr (--lr {cfg.lr:g})")
        return kept, uploads, losses, sorted(dropped + bad)

    def aggregate(self, uploads: list[dict[str, Tensor]], w: Tensor, ranks: list[int], phase: Optional[str],
                  glob: dict[str, Tensor]):
        """The server step: the method (aggregators.py through states.aggregate_states) on the
        uploads with weights p_k; returns its result and the new global trainable state."""
        cfg, t = self.cfg, self.round
        options = dict(cfg.agg_options)
        if (cfg.method == "lorafair" and options.get("init") == "xavier") or cfg.method == "spectral":
            options["seed"] = _seed(cfg.seed, t, 3)                  # its random draws, the same on every process
        if cfg.method == "frlora":
            options["init"] = self.init
        if cfg.method == "rolora":
            options["phase"] = phase
        if any(r != self.R for r in ranks):
            options["ranks"] = ranks
        agg = aggregate_states(uploads, w, cfg.method, **options)
        new = dict(glob)
        new.update(agg.state)
        if cfg.method == "fedsa":   # the global B (for global evaluation) is B_bar; clients keep their own
            for key in self.b_keys:
                new[key] = weighted_mean(torch.stack([u[key] for u in uploads]), w.to(uploads[0][key]))
        # what no client trained keeps its global value: frozen factors, unheld rank slots (states.py)
        new = keep_unheld(new, glob, cfg.method, ranks, phase)
        return agg, {key: new[key] for key in glob}

    @torch.no_grad()
    def apply(self, new: dict[str, Tensor], delta_w: dict[str, Tensor]) -> None:
        """The new global adapter, delta_w folded into W0, FLoRA's and FLoRIST's fresh LoRA; rank
        0's values on every process (folds too), so last-bit differences never accumulate."""
        load_lora_state(self.model, exchange.from_lead(new, self.world))
        if delta_w:
            fold_into_base(self.model, exchange.from_lead(delta_w, self.world))
        if self.cfg.method in RESTARTS:   # fresh LoRA for next round, the same on every client
            reset_lora(self.model, _seed(self.cfg.seed, self.round + 1, 4))

    def wire_bytes(self, upload: dict[str, Tensor], ranks: list[int], phase: Optional[str],
                   delta_w: dict[str, Tensor]) -> dict[str, int]:
        """Bytes this round moves in a real deployment (`wire_bytes`)."""
        return wire_bytes(self.cfg.method, self.cfg.local_head, upload, self.a_keys, self.b_keys, self.head_keys,
                          self.R, ranks, phase, delta_w)

    @property
    def folds(self) -> bool:
        """Whether this run changes the backbone's weights (FLoRA, FedEx-LoRA, FLoRIST, FRLoRA, client_init='fresh')."""
        return self.cfg.method in FOLDS or self.cfg.client_init == "fresh"

    def share_unreadable(self) -> None:
        """torchrun: every process learns the unreadable images the others met."""
        self.unreadable_images.share(self.world, self.device)

    def unreadable(self) -> dict[str, dict[str, int]]:
        return self.unreadable_images.report()

    # ------------------------------------------------------------------ evaluation

    def counts(self, dataset) -> tuple[int, int, int]:
        """(correct, readable, unreadable) top-1 counts of the current model on `dataset`."""
        return count_correct(self.model, dataset, self.cfg, self.device)

    def evaluate(self) -> dict[str, float]:
        """Top-1 of the global model on each domain's test split, and their mean (the paper's metric).

        FedSA-LoRA is personalised: a domain is scored with each of its clients' own B, averaged (a
        client never drawn yet with its initial B, the model it would start from).
        Unreadable test images are left out (not scored as wrong) and counted in `unreadable_images.test`.
        Under torchrun every process calls this: the (domain, adapter) evaluations are shared out
        round-robin and their counts summed, so no process waits while another evaluates alone.
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
                load_lora_state(self.model, c.state or self.local.own_init)
                self.local.set_scaling(c.scale or self.scale)
            found[i] = torch.tensor(self.counts(self.domains[d].test))
            if c is not None:
                load_lora_state(self.model, glob)
                self.local.set_scaling(self.scale)
        found = exchange.sum_counts(found, self.world, self.device)          # each row filled by one process
        acc = {}
        for d, dom in enumerate(self.domains):
            rows = [found[i].tolist() for i, (e, _) in enumerate(items) if e == d]
            if all(ok == 0 and bad > 0 for _, ok, bad in rows):
                raise DataError(f"every one of the {rows[0][2]} test images of {dom.name} could not be decoded; "
                                "check the image files")
            acc[dom.name] = sum(right / max(ok, 1) for right, ok, _ in rows) / len(rows)
            self.unreadable_images.test[dom.name] = rows[-1][2]
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
        out.update({f"init/{k}": v for k, v in self.init.items()})
        out.update(self.privacy.tensors() if self.privacy else {})
        out.update(self.unreadable_images.tensors())
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
        if self.init:
            self.init = {k: tensors[f"init/{k}"].to(self.device) for k in self.init}
        self.unreadable_images.load(tensors)
        if self.privacy:
            self.privacy = dp.Privacy.from_tensors(self.privacy.cfg, tensors)
            self.set_noise()
        self.round = rounds_done

    def set_noise(self) -> None:
        """Each client's DP-SGD noise multiplier from the ledger (None without DP)."""
        for k, c in enumerate(self.clients):
            c.noise = self.privacy.sigma[k] if self.privacy else None


# ---------------------------------------------------------------------------- the clients' half of a round

class LocalTraining:
    """What a client does in a round, on the one shared model: start from the global adapter (at
    its rank and scaling, with what its method keeps), train with local SGD (its rank's padding
    held at zero), upload in the global adapter's units."""

    def __init__(self, model: nn.Module, domains: list[DomainData], cfg: FedConfig, device: torch.device,
                 unreadable: Unreadable):
        self.model, self.domains, self.cfg, self.device, self.unreadable = model, domains, cfg, device, unreadable
        keys = list(trainable_state(model))
        self.a_keys = [k for k in keys if k.endswith("lora_A.weight")]
        self.b_keys = [k for k in keys if k.endswith("lora_B.weight")]
        self.head_keys = [k for k in keys if k not in self.a_keys and k not in self.b_keys]
        first = next(iter(lora_layers(model).values()), None)
        self.R, self.scale = (first[0].r, first[0].scaling) if first else (None, None)   # global rank, s_G
        # FedSA-LoRA: a client's own B (and head, local_head) as initialised, which a client drawn
        # for the first time starts from (each client owns a model in the authors' per-client mode)
        own = self.b_keys + (self.head_keys if cfg.local_head else [])
        self.own_init = {k: v for k, v in trainable_state(model).items() if k in own} if cfg.method == "fedsa" else {}

    def set_trainable_factors(self, phase: Optional[str]) -> None:
        """FFA-LoRA, FedSVD and FRLoRA train B only; RoLoRA trains only this round's factor."""
        params = dict(self.model.named_parameters())
        train_A = self.cfg.method not in FROZEN_A and phase != "B"
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
    def start(self, client: Client, glob: dict[str, Tensor], phase: Optional[str] = None) -> None:
        """Every method starts from the global adapter and head; FedSA swaps in the client's own B
        (its initial B the first time it is drawn), client_init='local' the client's whole last
        adapter. A client of rank r_k takes the leading r_k rows of A and columns of B, and the
        factor it trains divided by s_k / s_G, so that its adapter, at its own scaling s_k, adds
        what the global one does (aggregators.client_factors)."""
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

    def train(self, client: Client, seed: int) -> float:
        """Local SGD on the client's data (`local_sgd`, seeded by `seed`); returns the mean loss."""
        torch.manual_seed(seed)                                          # dropout
        if self.cfg.dp is not None and self.cfg.dp.secret:               # DP's draws unknown to the seed's holder
            seed = secrets.randbits(63)
        g = torch.Generator().manual_seed(seed)                          # shuffling (DP: Poisson sampling)
        data = Subset(_Indexed(self.train_set(client)), client.indices)
        kw = dict(generator=g, num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda",
                  persistent_workers=self.cfg.workers > 0)             # one worker pool for all epochs
        if client.noise is None:
            loader, noise = DataLoader(data, batch_size=self.cfg.batch_size, shuffle=True, **kw), None
        else:                                                            # DP-SGD: sigma_k and its own draws
            loader = dp.poisson_loader(data, dp.sample_rate(client.n, self.cfg.batch_size), **kw)
            noise = (client.noise, torch.Generator(self.device).manual_seed(_seed(seed, 5)))
        masks = rank_masks(self.model, self.a_keys, self.b_keys, client.rank, self.R)
        name = self.domains[client.domain].name if client.domain >= 0 else "all"
        loss, unreadable = local_sgd(self.model, loader, masks, self.cfg, self.device, f"  client (domain {name})",
                                     noise)
        self.unreadable.note(client.domain, unreadable)
        return loss

    def to_global_units(self, client: Client, upload: dict[str, Tensor], phase: Optional[str]) -> dict[str, Tensor]:
        """A client's upload with its scaling folded into the trained factor (weight units of s_G)."""
        if not self.heterogeneous(client):
            return upload
        ratio = (client.scale or self.scale) / self.scale
        return {k: v * ratio if k in self.trained(phase) else v for k, v in upload.items()}

    @torch.no_grad()
    def adapter_products(self) -> dict[str, Tensor]:
        """B A of every adapter (B @ A units), what client_init='fresh' folds into W0."""
        return {p: lora.lora_B.weight @ lora.lora_A.weight for p, (lora, _, _) in lora_layers(self.model).items()}

    def set_scaling(self, s: float) -> None:
        for lora, _, _ in lora_layers(self.model).values():
            lora.scaling = s

    def train_set(self, client: Client):
        if client.domain < 0:
            return ConcatDataset([d.train for d in self.domains])
        return self.domains[client.domain].train


def rank_masks(model: nn.Module, a_keys: list[str], b_keys: list[str], r: Optional[int], R: int) -> list:
    """(parameter, 0/1 mask) pairs that keep a rank-r client's padding (rows r.. of A, columns r..
    of B) at zero: its gradient is multiplied by the mask. None for a full-rank client."""
    if r is None or r >= R:
        return []
    named = dict(model.named_parameters())
    device = next(iter(named.values())).device
    keep = lambda k: (torch.arange(R, device=device) < r).to(named[k])   # noqa: E731   (R,)
    return ([(named[k], keep(k)[:, None]) for k in a_keys if named[k].requires_grad]
            + [(named[k], keep(k)[None, :]) for k in b_keys if named[k].requires_grad])


def local_sgd(model: nn.Module, loader: DataLoader, masks: list, cfg: FedConfig, device: torch.device,
              desc: str = "client", noise: Optional[tuple[float, torch.Generator]] = None) -> tuple[float, list[int]]:
    """The client's local update: SGD with momentum, weight decay and gradient clipping on the
    trainable tensors, for `local_epochs` epochs capped at `local_steps` steps (or exactly
    `local_steps` when `local_epochs` <= 0). Samples with y = -1 (unreadable) count in neither
    loss nor gradient. No host syncs inside the loop. Returns the mean loss and the indices of
    unreadable samples met.
    With `noise` = (sigma, generator), DP-SGD (dp.py) instead of the batch's clip: each record's
    gradient clipped to cfg.dp.clip, the sum noised and divided by the batch size, then the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    private = nullcontext() if noise is None else \
        dp.private(model, opt, noise[0], cfg.dp.clip, cfg.batch_size, noise[1])   # Opacus's hooks while it trains
    with private as dp_opt:                                          # None without DP
        return _steps(model, loader, masks, cfg, device, desc, params, opt, dp_opt)


def _steps(model, loader, masks, cfg, device, desc, params, opt, dp_opt) -> tuple[float, list[int]]:
    """local_sgd's loop: the round's steps over `loader`, re-read each epoch."""
    total = step_count(len(loader), cfg)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()
    loss_sum = torch.zeros((), device=device)
    unreadable = []                                                  # sample indices with y = -1
    model.train()
    step = 0
    bar = tqdm(total=total, desc=desc, leave=False, disable=not cfg.progress)
    while step < total:
        for x, y, i in loader:
            unreadable.append(i[y < 0])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with amp:
                logits = model(x)
            valid = (y >= 0).sum()
            summed = F.cross_entropy(logits.float(), y, ignore_index=-1, reduction="sum")
            loss = summed / valid.clamp_min(1)
            if dp_opt is None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
            else:                                                    # DP: each record's gradient of its
                dp_opt.zero_grad(set_to_none=True)                   # own loss, clipped, summed, noised, / L
                summed.backward()
                dp_opt.pre_step()
            for p, keep in masks:                                    # rank r_k: padding stays zero
                p.grad.mul_(keep)
            if dp_opt is None:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            loss_sum += loss.detach()
            step += 1
            bar.update()
            if step >= total:
                break
    bar.close()
    return (loss_sum / max(step, 1)).item(), torch.cat(unreadable).tolist() if unreadable else []


def step_count(batches: int, cfg: FedConfig) -> int:
    """Local steps a round: `local_epochs` epochs of `batches`, capped at `local_steps` (exactly
    `local_steps` when `local_epochs` <= 0)."""
    total = cfg.local_epochs * batches
    if cfg.local_steps:
        total = cfg.local_steps if cfg.local_epochs <= 0 else min(total, cfg.local_steps)
    return total


def sample_clients(n_clients: int, participation: float, seed: int, t: int) -> list[int]:
    """The clients of round t: a fraction `participation` of them, drawn by the seed and the round."""
    g = torch.Generator().manual_seed(_seed(seed, t, 1))
    m = max(1, round(participation * n_clients))
    return sorted(torch.randperm(n_clients, generator=g)[:m].tolist())


def plan_privacy(clients: list[Client], cfg: FedConfig, rounds: int) -> dp.Privacy:
    """DP-SGD's noise for each client (cfg.dp), calibrated for the rounds 1..`rounds` it is
    sampled for, S_k local steps each (Poisson batches at q_k = L / n_k)."""
    rate = [dp.sample_rate(c.n, cfg.batch_size, k) for k, c in enumerate(clients)]
    per_round = [step_count(dp.poisson_batches(q), cfg) for q in rate]
    return dp.Privacy.calibrate(cfg.dp, rate, per_round, rounds_taken(len(clients), cfg, rounds))


def rounds_taken(n_clients: int, cfg: FedConfig, rounds: int) -> list[int]:
    """How many of rounds 1..`rounds` each client is sampled for."""
    taken = [0] * n_clients
    for t in range(rounds):
        for k in sample_clients(n_clients, cfg.participation, cfg.seed, t):
            taken[k] += 1
    return taken


# ---------------------------------------------------------------------------- the round's record

def round_record(t: int, kept: list[int], dropped: list[int], losses: list[float], agg, wire: dict,
                 t_train: float, t_agg: float) -> dict:
    """metrics.jsonl's record of round t: its clients, bytes, mean loss, and how far the applied
    update is from dW (states.diagnostics), averaged over layers and per layer."""
    mean = lambda d: sum(d.values()) / len(d)   # noqa: E731
    return {"round": t, "clients": kept, "dropped": dropped, "bytes": wire,
            "train_loss": sum(losses) / len(losses),
            "cos": mean(agg.cos),
            "rel_err": mean(agg.rel_err),
            "cos_fedit": mean(agg.cos_fedit),                # FedIT's, same inputs
            "ceiling": mean(agg.ceiling),                    # best any B' on A_bar reaches
            "scale": mean(agg.scale),                        # ||dW_applied|| / ||dW||
            **({"eq8_0": sum(v[0] for v in agg.eq8.values()) / len(agg.eq8),   # LoRA-FAIR: Eq. 8 at dB = 0
                "eq8": sum(v[1] for v in agg.eq8.values()) / len(agg.eq8)} if agg.eq8 else {}),   # at its dB
            "layers": {p: {"cos": agg.cos[p], "cos_fedit": agg.cos_fedit[p], "ceiling": agg.ceiling[p],
                           "scale": agg.scale[p],
                           **({"eq8_0": agg.eq8[p][0], "eq8": agg.eq8[p][1]} if p in agg.eq8 else {})}
                       for p in agg.cos},
            "seconds": {"train": t_train, "aggregate": t_agg}}


def wire_bytes(method: str, local_head: bool, upload: dict[str, Tensor], a_keys: list[str], b_keys: list[str],
               head_keys: list[str], R: int, ranks: list[int], phase: Optional[str],
               delta_w: dict[str, Tensor]) -> dict[str, int]:
    """Bytes a round moves in a real deployment, summed over its K clients: 'up', what they
    upload, and 'down', what each must receive to start the next round. A client uploads and
    receives only what its method exchanges: FFA-LoRA's and FRLoRA's B (A is frozen and known; an
    FRLoRA client folds B_bar A0 - B0 A0 itself), FedSA-LoRA's A (B stays), RoLoRA's factor of the
    round, FedSVD's B up and both factors down (the server re-factorises A); the head unless it is
    kept local. FedEx-LoRA's
    clients also receive the dense residual they fold into W0, FLoRA's the K stacked adapters,
    FLoRIST's the rank-m factors of the update they fold.
    A client of rank r_k moves r_k of the R rows of A and columns of B."""
    factor_keys = set(a_keys + b_keys)

    def size(keys, r=R):
        return sum(upload[k].numel() * upload[k].element_size() * (r / R if k in factor_keys else 1) for k in keys)
    head = [] if method == "fedsa" and local_head else head_keys
    factors = {"ffa": b_keys, "fedsvd": b_keys, "frlora": b_keys, "fedsa": a_keys,
               "rolora": a_keys if phase == "A" else b_keys}.get(method, a_keys + b_keys)
    up = down = sum(size(factors + head, r) for r in ranks)          # each client receives what it sends
    if method == "fedsvd":                                           # and the server's new A
        down = sum(size(a_keys + b_keys + head, r) for r in ranks)
    if method == "fedex":
        down += len(ranks) * sum(d.numel() * d.element_size() for d in delta_w.values())
    if method == "flora":
        down = len(ranks) * (sum(size(a_keys + b_keys, r) for r in ranks) + size(head))
    if method == "florist":   # the truncated factors U_m S_m, V_m^T of each layer, m = rank(delta_w),
        # counting components above max(d) eps (of delta_w's dtype) times the largest: its rounding
        # noise stays below that, and a smaller kept component carries nothing at that precision
        per = sum(int(torch.linalg.matrix_rank(d.float(), rtol=max(d.shape) * torch.finfo(d.dtype).eps))
                  * sum(d.shape) * upload[b_keys[0]].element_size() for d in delta_w.values())
        down = len(ranks) * (per + size(head))
    return {"up": int(up), "down": int(down)}


class Unreadable:
    """Images that exist but could not be decoded (label -1), per domain: the distinct training
    images met so far (indices into the domain's train split) and the test images of the last
    evaluation. All are left out of the loss and of accuracy."""

    def __init__(self, domains: list[DomainData]):
        self.domains = domains
        self.train = {d.name: set() for d in domains}
        self.test = {d.name: 0 for d in domains}

    def note(self, domain: int, indices: list[int]) -> None:
        """Training images of `domain` found unreadable; domain -1 (the centralised client):
        `indices` index the concatenation of every domain's train split."""
        if domain >= 0:
            self.train[self.domains[domain].name].update(indices)
            return
        ends = ConcatDataset([d.train for d in self.domains]).cumulative_sizes
        for i in indices:
            d = bisect.bisect_right(ends, i)
            self.train[self.domains[d].name].add(i - (ends[d - 1] if d else 0))

    def share(self, world: int, device) -> None:
        """torchrun: add the images every other process met (indices into the concatenation)."""
        ends = ConcatDataset([d.train for d in self.domains]).cumulative_sizes
        mine = torch.tensor([(ends[d - 1] if d else 0) + i for d, dom in enumerate(self.domains)
                             for i in sorted(self.train[dom.name])], dtype=torch.long)
        self.note(-1, exchange.gather_indices(mine, world, device).tolist())

    def report(self) -> dict[str, dict[str, int]]:
        """{domain: {"train": n, "test": n}} for the domains with any."""
        return {d: {"train": len(self.train[d]), "test": self.test[d]}
                for d in self.train if self.train[d] or self.test[d]}

    def tensors(self) -> dict[str, Tensor]:
        return {f"unreadable/{d}": torch.tensor(sorted(s), dtype=torch.long) for d, s in self.train.items() if s}

    def load(self, tensors: dict[str, Tensor]) -> None:
        for d in self.train:
            self.train[d] = set(tensors[f"unreadable/{d}"].tolist()) if f"unreadable/{d}" in tensors else set()


# ---------------------------------------------------------------------------- evaluation, helpers

@torch.no_grad()
def count_correct(model: nn.Module, dataset, cfg: FedConfig, device: torch.device) -> tuple[int, int, int]:
    """(correct, readable, unreadable) top-1 counts of `model` on `dataset` (y = -1: unreadable)."""
    loader = DataLoader(dataset, batch_size=max(cfg.batch_size, 256), num_workers=cfg.workers,
                        pin_memory=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()
    correct = torch.zeros((), dtype=torch.long, device=device)
    n = bad = 0
    model.eval()
    for x, y in loader:
        bad += int((y < 0).sum())                    # y is still on the CPU: no device sync
        n += len(y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp:
            correct += (model(x).argmax(-1) == y).sum()   # y = -1 never matches
    return int(correct), n - bad, bad


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
