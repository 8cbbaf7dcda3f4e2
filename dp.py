"""Record-level differential privacy on the clients: DP-SGD through Opacus, PRV accounting.

The unit protected is one training record (image) of one client: neighbouring data sets differ by
adding or removing one record of one client (the relation Opacus's accountant bounds). Client k
runs DP-SGD (Abadi et al., 2016) in every round it takes part in:

  Poisson sampling: each of its n_k records joins a step's batch with probability q_k = L / n_k
      (L: the batch size), int(1 / q_k) steps an epoch (Opacus's DPDataLoader);
  g = ( sum_i min(1, C / ||g_i||) g_i + N(0, sigma_k^2 C^2 I) ) / L,
      g_i: record i's gradient of every trained tensor together (LoRA factors, head), computed per
      record by Opacus's GradSampleModule; C: the clip; the sum and noise by Opacus's DPOptimizer;
  then the plain SGD step (momentum, weight decay) on g. A rank-r_k client's padding is zeroed
      after the noise (the zeroing reads no data, so it spends nothing).

sigma_k is the smallest noise multiplier for which Opacus's PRV accountant bounds all the steps
client k takes over the run, S_k in each of the T_k rounds it is sampled for (the round's sample
reads no data, so T_k is known in advance), by (epsilon, delta). The server's aggregation reads
only the clients' updates: post-processing, which spends nothing.
Not protected: which clients take part; their sizes n_k, which set q_k, sigma_k, the steps and
the weights p_k and are treated as public (as in Opacus and the DP-SGD literature); whole clients
(record-level, not client-level DP); the simulation's own diagnostics (each client's training loss
and unreadable images in metrics.jsonl). The server sees each client's noised update.
The noise and the batches are drawn from the run's --seed, so that a run is reproducible: the
guarantee holds against anyone who does not know that seed. DPConfig.secret draws them from the
operating system's entropy instead, as a deployment must (a run is then not repeatable).

Opacus is imported inside these functions only, so a run without DP never imports it.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

ACCOUNTANT = "prv"      # Opacus's privacy-loss-random-variable accountant (Gopi et al., 2021)


@dataclass(frozen=True)
class DPConfig:
    epsilon: float          # each client's records are (epsilon, delta)-DP over the whole run
    delta: float = 1e-5
    clip: float = 2.0       # C, the bound on one record's gradient norm (FedSVD's public DP runs use 2)
    secret: bool = False    # noise and batches from the OS's entropy, not the run's seed (not repeatable)


def sample_rate(n: int, batch_size: int, k: int = 0) -> float:
    """q_k = L / n_k, the probability that a record joins a step's batch (Poisson sampling)."""
    if n <= batch_size:
        raise ValueError(f"client {k} has {n} records, not more than the batch size {batch_size}: DP-SGD samples "
                         f"a record with probability batch size / records, which must be below 1; lower "
                         f"--batch-size below {n}")
    return batch_size / n


def poisson_batches(q: float) -> int:
    """Steps in one epoch of Poisson sampling at rate q (Opacus's DPDataLoader: int(1 / q))."""
    return int(1 / q)


@functools.lru_cache(maxsize=None)
def noise_multiplier(epsilon: float, delta: float, q: float, steps: int) -> float:
    """The smallest sigma (within Opacus's tolerance 0.01 in epsilon) for which `steps` steps at
    sample rate q are (epsilon, delta)-DP by the PRV accountant."""
    from opacus.accountants.utils import get_noise_multiplier
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # Opacus's note on the RDP orders it searches
            return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                        accountant=ACCOUNTANT)
    except ValueError as e:
        raise ValueError(f"no noise multiplier makes {steps} steps at sample rate {q:.4g} "
                         f"({epsilon:g}, {delta:g})-DP ({e}); raise --dp-epsilon or train fewer steps") from None


@functools.lru_cache(maxsize=None)
def epsilon_spent(sigma: float, q: float, steps: int, delta: float) -> float:
    """epsilon of `steps` DP-SGD steps at noise multiplier sigma and rate q, by Opacus's PRV accountant."""
    if steps == 0:
        return 0.0
    from opacus.accountants import PRVAccountant
    acc = PRVAccountant()
    for _ in range(steps):                             # what the accountant's optimizer hook records
        acc.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


class Privacy:
    """The run's ledger: each client's noise multiplier sigma_k, sample rate q_k, steps a round S_k,
    the rounds T_k its noise was calibrated for, and the steps it has taken. This is all an Opacus
    accountant holds for the client (history [(sigma_k, q_k, steps)]), so the checkpoint keeps it."""

    def __init__(self, cfg: DPConfig, sigma: list[float], rate: list[float], per_round: list[int],
                 planned: list[int], steps: Optional[list[int]] = None):
        self.cfg, self.sigma, self.rate, self.per_round, self.planned = cfg, sigma, rate, per_round, planned
        self.steps = list(steps) if steps is not None else [0] * len(sigma)

    @classmethod
    def calibrate(cls, cfg: DPConfig, rate: list[float], per_round: list[int], taken: list[int]) -> "Privacy":
        """sigma_k for the T_k = taken[k] rounds of S_k = per_round[k] steps client k will train
        (a client never sampled is calibrated for one round, so it is covered if a resume adds one)."""
        planned = [max(t, 1) for t in taken]
        sigma = [noise_multiplier(cfg.epsilon, cfg.delta, q, t * s) for q, s, t in zip(rate, per_round, planned)]
        return cls(cfg, sigma, rate, per_round, planned)

    def spend(self, k: int) -> None:
        """Client k trained a round: S_k more steps at (sigma_k, q_k)."""
        self.steps[k] += self.per_round[k]

    def epsilon(self, k: int, steps: Optional[int] = None) -> float:
        return epsilon_spent(self.sigma[k], self.rate[k], self.steps[k] if steps is None else steps, self.cfg.delta)

    def report(self) -> dict:
        """For every client that has trained: epsilon spent so far and what it was spent at."""
        ks = [k for k in range(len(self.sigma)) if self.steps[k]]
        return {"epsilon": {str(k): self.epsilon(k) for k in ks}, "delta": self.cfg.delta,
                "accountant": ACCOUNTANT, "clip": self.cfg.clip, "noise_multiplier": {str(k): self.sigma[k] for k in ks},
                "sample_rate": {str(k): self.rate[k] for k in ks}, "steps": {str(k): self.steps[k] for k in ks}}

    def check_budget(self, taken: list[int]) -> None:
        """Refuse (ValueError, with the numbers) a plan of taken[k] rounds for client k that would
        spend more than epsilon at the noise calibrated for self.planned[k]."""
        for k, t in enumerate(taken):
            if t > self.planned[k]:
                eps = self.epsilon(k, t * self.per_round[k])
                if eps > self.cfg.epsilon:
                    raise ValueError(
                        f"client {k} would spend epsilon {eps:.3f} > {self.cfg.epsilon:g} (delta {self.cfg.delta:g}) "
                        f"in {t} rounds of {self.per_round[k]} steps: its noise multiplier {self.sigma[k]:.4f} was "
                        f"calibrated for {self.planned[k]} rounds; resume with fewer --rounds, or start a new run")

    def tensors(self) -> dict[str, Tensor]:
        f64 = dict(dtype=torch.float64)
        return {"dp/sigma": torch.tensor(self.sigma, **f64), "dp/rate": torch.tensor(self.rate, **f64),
                "dp/per_round": torch.tensor(self.per_round), "dp/planned": torch.tensor(self.planned),
                "dp/steps": torch.tensor(self.steps)}

    @classmethod
    def from_tensors(cls, cfg: DPConfig, t: dict[str, Tensor]) -> "Privacy":
        if "dp/sigma" not in t:
            raise ValueError("the checkpoint holds no DP ledger, so it was not trained with --dp-epsilon")
        return cls(cfg, *(t[f"dp/{n}"].tolist() for n in ("sigma", "rate", "per_round", "planned", "steps")))


# ----------------------------------------------------------------------------- the client's DP-SGD

def poisson_loader(dataset, q: float, generator: torch.Generator, **loader_kw):
    """Batches of `dataset` by Poisson sampling at rate q (empty batches included), int(1 / q) an epoch."""
    from opacus.data_loader import DPDataLoader
    return DPDataLoader(dataset, sample_rate=q, generator=generator, **loader_kw)


@contextlib.contextmanager
def private(model: nn.Module, optimizer: torch.optim.Optimizer, sigma: float, clip: float, batch_size: int,
            generator: torch.Generator):
    """Opacus's per-record gradients on `model`'s trained tensors and its DP-SGD step around
    `optimizer`, for a `with` block that gets Opacus's DPOptimizer. The loss must be the sum over
    the batch's records; its pre_step() then sets p.grad = (sum of clipped g_i + N(0, sigma^2 C^2 I))
    / L, and optimizer.step() steps. The hooks leave the model when the block ends, however it ends."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    # the hooks fire on module outputs, as they should here (the input images need no gradient)
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    hooks = GradSampleModule(model, loss_reduction="sum")     # g_i of each record of a summed loss
    try:
        yield DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=clip,
                          expected_batch_size=batch_size, loss_reduction="mean",   # "mean": divide by L
                          generator=generator)
    finally:
        hooks._close()                                            # hooks and per-record gradients removed
