"""Datasets and client partitions: DomainNet, NICO++, and an embedded offline dataset.

A dataset here is, per domain, a train and a test list of (image, label). DomainNet and NICO++ are
read from their official split files `<root>/<domain>_{train,test}.txt` ("relative/path label"
per line; NICO++ class names contain spaces, so the label is split off the right). The embedded
dataset ("shapes") is drawn procedurally: every class is a fixed glyph of strokes, every domain a
rendering style, so the six domains share one label space the way DomainNet's do.

Partitions (paper, Setup): feature non-IID, one client per domain; feature + label non-IID,
`clients_per_domain` clients per domain with labels split by Dirichlet(alpha).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
NICOPP_DOMAINS = ("autumn", "dim", "grass", "outdoor", "rock", "water")
SHAPES_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class DataError(ValueError):
    """Bad data input (missing files, unknown domains, impossible partitions): a one-line message."""


@dataclass
class DomainData:
    name: str
    train: Dataset
    test: Dataset
    train_labels: list[int]


# ----------------------------------------------------------------------------- image folders

def read_split(root: str, domain: str, split: str, num_classes: int) -> list[tuple[str, int]]:
    """Parse `<root>/<domain>_<split>.txt`: lines 'relative/path label', labels < num_classes kept."""
    path = os.path.join(root, f"{domain}_{split}.txt")
    if not os.path.isfile(path):
        raise DataError(f"missing split file {path}: expected <root>/<domain>_train.txt and "
                        f"<root>/<domain>_test.txt with 'relative/path label' lines next to <root>/<domain>/")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            rel, _, label = line.rpartition(" ")
            if not rel or not label.lstrip("-").isdigit():
                raise DataError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
            if int(label) < num_classes:
                items.append((rel, int(label)))
    return items


class ImageList(Dataset):
    """Images listed by (relative path, label). A file that cannot be decoded yields label -1
    (ignored by the loss and counted by the caller) instead of crashing a round."""

    def __init__(self, root: str, items: list[tuple[str, int]], transform):
        self.root, self.items, self.transform = root, items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        rel, label = self.items[i]
        try:
            with Image.open(os.path.join(self.root, rel)) as im:
                return self.transform(im.convert("RGB")), label
        except (OSError, ValueError):
            return torch.zeros(3, *self.transform.size), -1


class _Transform:
    """Resize (bicubic) + ToTensor + Normalize, picklable for DataLoader workers."""

    def __init__(self, size: int, mean, std):
        from torchvision import transforms as T
        self.size = (size, size)
        self.t = T.Compose([T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                            T.Normalize(mean, std)])

    def __call__(self, im):
        return self.t(im)


def make_transform(model_cfg: dict, norm: str = "model") -> _Transform:
    """From timm's data config for the model (input size, mean/std); norm='clip' uses CLIP's stats."""
    size = model_cfg.get("input_size", (3, 224, 224))[-1]
    mean, std = (CLIP_MEAN, CLIP_STD) if norm == "clip" else (model_cfg["mean"], model_cfg["std"])
    return _Transform(size, mean, std)


def load_image_domains(root: str, dataset: str, domains: list[str] | None, num_classes: int,
                       transform) -> list[DomainData]:
    """DomainNet or NICO++ from the official layout `<root>/<domain>/...` plus split files."""
    known = DOMAINNET_DOMAINS if dataset == "domainnet" else NICOPP_DOMAINS
    where = ("http://ai.bu.edu/M3SDA/" if dataset == "domainnet" else "https://nicochallenge.com/dataset")
    if not root or not os.path.isdir(root):
        raise DataError(f"--data-root {root!r} is not a directory; {dataset} expects <root>/<domain>/<class>/<img> "
                        f"and <root>/<domain>_train.txt, <domain>_test.txt (official data: {where})")
    domains = list(domains or known)
    for d in domains:
        if d not in known:
            raise DataError(f"unknown {dataset} domain {d!r}; choose from {', '.join(known)}")
    out = []
    for d in domains:
        train, test = read_split(root, d, "train", num_classes), read_split(root, d, "test", num_classes)
        if not train or not test:
            raise DataError(f"{dataset} domain {d}: no samples with label < {num_classes} in its split files")
        out.append(DomainData(d, ImageList(root, train, transform), ImageList(root, test, transform),
                              [y for _, y in train]))
    return out


# ----------------------------------------------------------------------------- embedded "shapes"

SHAPES_SIZE = 32
SHAPES_CLASSES = 10          # federated task: classes 0..9
PRETRAIN_CLASSES = (10, 40)  # backbone pretraining: classes 10..39, disjoint from the task


def _segments(classes: Tensor, strokes: int = 3) -> Tensor:
    """Each class's glyph: `strokes` segments with endpoints fixed by the class id: (N, S, 2, 2)."""
    protos = {}
    for c in classes.unique().tolist():
        g = torch.Generator().manual_seed(7919 * c + 13)
        protos[c] = torch.rand(strokes, 2, 2, generator=g) * 1.4 - 0.7
    return torch.stack([protos[c] for c in classes.tolist()])


def _ink(seg: Tensor, width: Tensor, g: torch.Generator, jitter: float) -> Tensor:
    """Render segments (N, S, 2, 2) after a random similarity transform: ink in [0, 1], (N, H, W)."""
    N, H = seg.shape[0], SHAPES_SIZE
    theta = (torch.rand(N, generator=g) * 2 - 1) * jitter
    scale = 1 + (torch.rand(N, generator=g) * 2 - 1) * 0.6 * jitter
    shift = (torch.rand(N, 1, 2, generator=g) * 2 - 1) * 0.5 * jitter
    rot = torch.stack([torch.stack([theta.cos(), -theta.sin()], -1), torch.stack([theta.sin(), theta.cos()], -1)], -2)
    pts = torch.einsum("nij,nspj->nspi", rot * scale[:, None, None], seg) + shift[:, None]   # (N, S, 2, 2)
    lin = torch.linspace(-1, 1, H)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).reshape(1, 1, H * H, 2)  # (1, 1, P, 2)
    a, b = pts[:, :, None, 0], pts[:, :, None, 1]                                           # (N, S, 1, 2)
    ab = b - a
    t = (((grid - a) * ab).sum(-1) / ab.square().sum(-1).clamp_min(1e-6)).clamp(0, 1)      # (N, S, P)
    dist = (grid - (a + t[..., None] * ab)).norm(dim=-1).amin(1)                           # (N, P)
    return torch.exp(-(dist / width[:, None]).square()).reshape(N, H, H)


def _smooth_noise(N: int, cells: int, g: torch.Generator) -> Tensor:
    """Low-frequency colour noise: (N, 3, H, W) in [0, 1]."""
    z = torch.rand(N, 3, cells, cells, generator=g)
    return torch.nn.functional.interpolate(z, size=SHAPES_SIZE, mode="bicubic", align_corners=False).clamp(0, 1)


def render_shapes(classes: Tensor, domain: int, g: torch.Generator) -> Tensor:
    """Images of the given classes in one of the six styles: (N, 3, 32, 32) in [0, 1]."""
    N = len(classes)
    seg = _segments(classes)
    rand = lambda *s: torch.rand(*s, generator=g)                      # noqa: E731
    full = lambda v: torch.full((N,), v)                               # noqa: E731
    if domain == 0:    # clipart: flat bright colours, thick strokes
        ink = _ink(seg, full(0.09), g, 0.3)[:, None]
        bg, fg = rand(N, 3, 1, 1) * 0.5 + 0.5, rand(N, 3, 1, 1) * 0.6
    elif domain == 1:  # infograph: glyph among clutter strokes of another colour on a grid
        ink = _ink(seg, full(0.07), g, 0.3)[:, None]
        clutter = _ink(rand(N, 2, 2, 2) * 1.8 - 0.9, full(0.05), g, 0.0)[:, None]
        grid = (torch.arange(SHAPES_SIZE) % 8 == 0).float()
        bg = 0.85 - 0.2 * torch.maximum(grid[None, :], grid[:, None])[None, None] - 0.6 * clutter * rand(N, 3, 1, 1)
        fg = rand(N, 3, 1, 1) * 0.4
    elif domain == 2:  # painting: soft strokes over smooth colour fields, brush noise
        ink = _ink(seg, full(0.13), g, 0.35)[:, None]
        bg, fg = 0.35 + 0.5 * _smooth_noise(N, 3, g), _smooth_noise(N, 2, g) * 0.3
    elif domain == 3:  # quickdraw: thin binary black lines on white, larger jitter
        ink = (_ink(seg, full(0.05), g, 0.5) > 0.5).float()[:, None]
        bg, fg = torch.ones(N, 3, 1, 1), torch.zeros(N, 3, 1, 1)
    elif domain == 4:  # real: textured background, textured low-contrast object
        ink = _ink(seg, full(0.08), g, 0.35)[:, None]
        bg, fg = 0.3 + 0.6 * _smooth_noise(N, 6, g), _smooth_noise(N, 6, g) * 0.2 + rand(N, 3, 1, 1) * 0.15
    elif domain == 5:  # sketch: grey pencil lines with hatching on paper
        ink = _ink(seg, full(0.04), g, 0.35)[:, None] * 0.8
        hatch = ((torch.arange(SHAPES_SIZE)[:, None] + torch.arange(SHAPES_SIZE)[None]) % 5 == 0).float()
        bg = 0.95 - 0.15 * hatch[None, None] * rand(N, 1, 1, 1)
        fg = torch.full((N, 3, 1, 1), 0.25)
    else:
        raise DataError(f"shapes has domains 0..5, got {domain}")
    img = bg * (1 - ink) + fg * ink
    noise = 0.1 if domain in (2, 4) else 0.03
    return (img + noise * torch.randn(img.shape, generator=g)).clamp(0, 1)


class TensorImages(Dataset):
    """In-memory images (N, 3, H, W) in [0, 1], normalised on access."""

    def __init__(self, x: Tensor, y: Tensor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        self.x, self.y = x, y
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i] - self.mean) / self.std, int(self.y[i])


def shapes_split(domain: int, n: int, classes: tuple[int, int], seed: int) -> tuple[Tensor, Tensor]:
    """n balanced samples of classes [lo, hi) in one domain, drawn from `seed`: x (n, 3, 32, 32), y (n,)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = classes
    y = torch.arange(n) % (hi - lo) + lo
    y = y[torch.randperm(n, generator=g)]
    return render_shapes(y, domain, g), y - lo


def load_shapes(domains: list[str] | None, n_train: int, n_test: int, seed: int = 0) -> list[DomainData]:
    """The embedded dataset: 10 classes x 6 styles. Same seed, same pixels (the data seed is fixed
    per domain and split, independent of the run's seed, so every run sees the same dataset)."""
    domains = list(domains or SHAPES_DOMAINS)
    out = []
    for d in domains:
        if d not in SHAPES_DOMAINS:
            raise DataError(f"unknown shapes domain {d!r}; choose from {', '.join(SHAPES_DOMAINS)}")
        i = SHAPES_DOMAINS.index(d)
        xtr, ytr = shapes_split(i, n_train, (0, SHAPES_CLASSES), seed=1000 + 2 * i)
        xte, yte = shapes_split(i, n_test, (0, SHAPES_CLASSES), seed=1001 + 2 * i)
        out.append(DomainData(d, TensorImages(xtr, ytr), TensorImages(xte, yte), ytr.tolist()))
    return out


# ----------------------------------------------------------------------------- partitions

def partition(domains: list[DomainData], clients_per_domain: int = 1, alpha: float = 0.5,
              min_size: int = 10, seed: int = 0) -> list[tuple[int, list[int]]]:
    """Clients as (domain index, sample indices into that domain's train split).

    clients_per_domain = 1: feature non-IID, one client per domain (the paper's Table 1).
    Otherwise each domain's samples are split over its clients class by class with proportions
    drawn from Dirichlet(alpha); draws are repeated until every client has >= min_size samples.
    """
    if clients_per_domain < 1:
        raise DataError(f"--clients-per-domain must be >= 1, got {clients_per_domain}")
    if clients_per_domain > 1 and not alpha > 0:
        raise DataError(f"--dirichlet alpha must be > 0, got {alpha}")
    rng = random.Random(seed)
    clients = []
    for d, dom in enumerate(domains):
        n = len(dom.train_labels)
        if clients_per_domain == 1:
            clients.append((d, list(range(n))))
            continue
        if n < clients_per_domain * min_size:
            raise DataError(f"domain {dom.name} has {n} training samples, too few for {clients_per_domain} clients "
                            f"of at least {min_size}; lower --clients-per-domain")
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(dom.train_labels):
            by_class.setdefault(y, []).append(i)
        for _ in range(1000):
            parts = [[] for _ in range(clients_per_domain)]
            for c in sorted(by_class):
                idx = by_class[c][:]
                rng.shuffle(idx)
                p = [rng.gammavariate(alpha, 1.0) for _ in parts]
                cuts = [round(len(idx) * sum(p[: j + 1]) / sum(p)) for j in range(len(parts))]
                for j, part in enumerate(parts):
                    part.extend(idx[(cuts[j - 1] if j else 0): cuts[j]])
            if min(len(p) for p in parts) >= min_size:
                break
        else:
            raise DataError(f"domain {dom.name}: no Dirichlet({alpha}) split gives every one of "
                            f"{clients_per_domain} clients {min_size} samples; raise alpha or lower clients")
        clients.extend((d, sorted(p)) for p in parts)
    return clients
