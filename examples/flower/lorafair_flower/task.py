"""What the ServerApp and every ClientApp build from the same train.py arguments: the data split,
the model (pretrained backbone, LoRA, head, all seeded as train.py seeds them) and fed.py's
Federation, so that a Flower round does the arithmetic of a train.py round.

    state_record / load_state   the model state that crosses the wire, as a Flower ArrayRecord
"""
from __future__ import annotations

import os
import shlex
import sys

import torch
from flwr.app import ArrayRecord

# the repository's modules (train.py, fed.py, ...): this checkout, or LORAFAIR_ROOT where the app was
# installed elsewhere (`flwr run` installs the app on every node without the rest of the repository)
ROOT = os.environ.get("LORAFAIR_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
if not os.path.isfile(os.path.join(ROOT, "train.py")):
    raise ImportError(f"the LoRA-FAIR repository is not at {ROOT}; set LORAFAIR_ROOT to a checkout of it")
sys.path.insert(0, ROOT)
import train  # noqa: E402
from backbone import build_model, check_weights  # noqa: E402
from data import list_images, make_transform  # noqa: E402
from fed import Federation  # noqa: E402
from lora import load_lora_state, lora_layers  # noqa: E402

DEFAULT_ARGS = "--dataset shapes --method lorafair --rounds 3"


def build(train_args: str) -> tuple:
    """(resolved arguments, Federation) exactly as train.py builds them for these arguments."""
    args = train.resolve(train.get_args_parser().parse_args([*shlex.split(train_args), "--no-progress"]))
    if args.dp_epsilon is not None:
        raise ValueError("--dp-epsilon: DP-SGD clients run in train.py (its privacy ledger is train.py's "
                         "checkpoint); this Flower example does not run them")
    listing = None
    if args.dataset != "shapes":
        listing = list_images(args.dataset, args.data_root, args.domains.split(",") if args.domains else None,
                              args.num_classes, args.splits, args.split_seed)
    domains, clients = train.build_data(args, listing)
    weights = check_weights(args)
    torch.manual_seed(args.seed)                      # the head's init, as in train.prepare
    model, model_cfg = build_model(args, weights)
    for d in domains if listing is not None else ():
        d.train.transform = d.test.transform = make_transform(model_cfg, args.norm)
    device = torch.device(args.device)
    return args, Federation(model.to(device), domains, clients, train.fed_config(args), device)


def folds(fed: Federation) -> bool:
    """Whether this run changes the backbone's weights (FLoRA, FedEx-LoRA, FLoRIST, --client-init fresh)."""
    return fed.folds


def model_state(fed: Federation) -> dict[str, torch.Tensor]:
    """What a client needs to start a round: every LoRA factor and the head (frozen factors too:
    RoLoRA's and FFA-LoRA's), and for folding methods the adapted layers' base weights (the
    `base/` entries of fed.state_tensors)."""
    params = dict(fed.model.named_parameters())
    out = {k: params[k].detach().clone() for k in fed.a_keys + fed.b_keys + fed.head_keys}
    if folds(fed):
        out.update({k: v for k, v in fed.state_tensors().items() if k.startswith("base/")})
    return out


@torch.no_grad()
def load_state(fed: Federation, state: dict[str, torch.Tensor]) -> None:
    """Inverse of model_state on a client's own Federation."""
    layers = lora_layers(fed.model)
    load_lora_state(fed.model, {k: v for k, v in state.items() if not k.startswith("base/")})
    for k, v in state.items():
        if k.startswith("base/"):
            layers[k[len("base/"):]][1].weight.copy_(v)


def record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def tensors(rec: ArrayRecord, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in rec.to_torch_state_dict().items()}
