"""Datasets and client partitions: DomainNet, NICO++, and an embedded offline dataset.

A dataset here is, per domain, a train and a test list of (image, label). DomainNet and NICO++ are
read as they are downloaded: their official split files ("relative/path label" per line, one file
per domain and split) or, for NICO++'s challenge download which has none, a seeded split made here
(`list_domainnet`, `list_nicopp`). Every listed image is checked to exist before training
(`check_images`); an image that cannot be decoded later is left out and counted. The embedded
dataset ("shapes") is drawn procedurally: every class is a fixed glyph of strokes, every domain a
rendering style, so the six domains share one label space the way DomainNet's do.

Partitions (paper, Setup): feature non-IID, one client per domain; feature + label non-IID,
`clients_per_domain` clients per domain with labels split by Dirichlet(alpha).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
NICOPP_DOMAINS = ("autumn", "dim", "grass", "outdoor", "rock", "water")     # the DG track's common contexts
DATASETS = {   # name: (domains, number of classes, where to download it)
    "domainnet": (DOMAINNET_DOMAINS, 345, "http://ai.bu.edu/M3SDA/"),
    "nicopp": (NICOPP_DOMAINS, 60, "https://nicochallenge.com/dataset"),
}
NICOPP_MAPPING = "dg_label_id_mapping.json"   # class name -> label, shipped with the NICO++ challenge data
NICOPP_TEST_FRACTION = 0.2                    # held out per (context, class) when no split files exist
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
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

def read_split(path: str, domain: str, dataset: str, num_classes: int,
               classes: dict[str, tuple[int, str]]) -> tuple[list[tuple[str, int]], int]:
    """Parse one split file: lines 'relative/path label' (DomainNet: `clipart/aircraft_carrier/
    clipart_001_000018.jpg 0`; NICO++: `NICO_DG/autumn/hot air balloon/x.jpg 29`). Returns the
    lines with label < num_classes, paths cut to start at the domain folder, and the number of lines.

    A byte-order mark, CRLF endings, tabs and spaces inside paths are read as meant. A label outside
    the dataset's classes, or a class folder given two labels (`classes`, shared across files: folder
    -> (label, where)), is an error naming the file and line.
    """
    total = DATASETS[dataset][1]
    items, lines = [], 0
    with open(path, encoding="utf-8-sig") as f:            # utf-8-sig drops a BOM; text mode folds CRLF
        for n, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)                    # the label is the last field; paths hold spaces
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
            label, folders = int(parts[1]), parts[0].replace("\\", "/").split("/")
            if not 0 <= label < total:
                raise DataError(f"{path}:{n}: label {label} is outside 0..{total - 1} ({dataset} has {total} "
                                "classes); is this the right split file?")
            if domain not in folders[:-1]:
                raise DataError(f"{path}:{n}: path {parts[0]!r} has no '{domain}/' folder; "
                                f"{os.path.basename(path)} must list images of domain {domain}")
            rel = folders[folders.index(domain):]           # NICO++'s 'NICO_DG/' prefix goes
            if len(rel) > 2:
                seen = classes.setdefault(rel[1], (label, f"{path}:{n}"))
                if seen[0] != label:
                    raise DataError(f"{path}:{n}: class folder {rel[1]!r} has label {label} here but {seen[0]} "
                                    f"at {seen[1]}; the split files come from different releases")
            lines += 1
            if label < num_classes:
                items.append(("/".join(rel), label))
    return items, lines


@dataclass
class Listing:
    """An image dataset as its split files describe it, before any image is opened."""
    dataset: str
    image_root: str               # the directory holding <domain>/<class>/<file>
    split_dir: Optional[str]      # where the split files were read; None: the split was made here
    items: dict[str, dict[str, list[tuple[str, int]]]]   # domain -> 'train'/'test' -> [(path under image_root, label)]
    lines: int                    # lines (or, for a made split, images) before the --num-classes filter
    num_classes: int

    @property
    def kept(self) -> int:
        return sum(len(v) for splits in self.items.values() for v in splits.values())

    def summary(self) -> str:
        total = DATASETS[self.dataset][1]
        where = f"split files in {self.split_dir}" if self.split_dir else "a split made here (no split files found)"
        s = f"{self.dataset}: images under {self.image_root}, {where}; kept {self.kept} of {self.lines} lines"
        if self.kept < self.lines:
            s += f" (classes 0..{self.num_classes - 1} of {total}; --num-classes {total} keeps all)"
        return s


def _domains(dataset: str, domains: Optional[list[str]]) -> list[str]:
    known = DATASETS[dataset][0]
    for d in domains or ():
        if d not in known:
            raise DataError(f"unknown {dataset} domain {d!r}; choose from {', '.join(known)}")
    return list(domains or known)


def _nearby(root: str, rel: str) -> Optional[str]:
    """The directory one level above or below `root` that holds `rel`: the root the user meant."""
    parent = os.path.dirname(os.path.abspath(root))
    if os.path.exists(os.path.join(parent, rel)):
        return parent
    try:
        subdirs = sorted(e.path for e in os.scandir(root) if e.is_dir())[:200]
    except OSError:
        return None
    return next((d for d in subdirs if os.path.exists(os.path.join(d, rel))), None)


def _level_hint(root: str, found: Optional[str]) -> str:
    """The fix when `found` (from _nearby) is where the data really is."""
    if not found:
        return ""
    side = "low" if os.path.abspath(found) == os.path.dirname(os.path.abspath(root)) else "high"
    return f"; --data-root is one level too {side}: pass --data-root {found}"


def _read_splits(dataset: str, num_classes: int, split_dir: str, domains: list[str]) -> tuple[dict, int]:
    items, lines, classes = {}, 0, {}
    for d in domains:
        items[d] = {}
        for split in ("train", "test"):
            path = os.path.join(split_dir, f"{d}_{split}.txt")
            if not os.path.isfile(path):
                raise DataError(f"missing split file {path}: {split_dir} holds split files for some domains only")
            items[d][split], n = read_split(path, d, dataset, num_classes, classes)
            lines += n
    return items, lines


def list_domainnet(root: str, domains: Optional[list[str]], num_classes: int,
                   splits: Optional[str] = None) -> Listing:
    """DomainNet as downloaded from http://ai.bu.edu/M3SDA/: `<root>/<domain>/<class>/<file>` (each
    domain's zip extracted in <root>) and the split files `<domain>_{train,test}.txt` in <root>,
    in <root>/splits, or in `splits`."""
    domains = _domains("domainnet", domains)
    if not root or not os.path.isdir(root):
        raise DataError(f"--data-root {root!r} is not a directory; DomainNet expects <root>/<domain>/<class>/<image> "
                        f"and the split files <root>/<domain>_train.txt, <domain>_test.txt ({DATASETS['domainnet'][2]})")
    first = f"{domains[0]}_train.txt"
    split_dir = splits or next((d for d in (root, os.path.join(root, "splits"))
                                if os.path.isfile(os.path.join(d, first))), None)
    if split_dir is None:
        fix = _level_hint(root, _nearby(root, first)) or (f" (download {first} and {domains[0]}_test.txt "
                                                          f"from {DATASETS['domainnet'][2]} into {root})")
        raise DataError(f"no DomainNet split file {first} in {root} or {root}/splits{fix}")
    items, lines = _read_splits("domainnet", num_classes, split_dir, domains)
    return Listing("domainnet", root, split_dir, items, lines, num_classes)


def _survey(root: str, depth: int) -> tuple[list[str], list[str], list[str]]:
    """Directories under `root`, breadth first, at most `depth` levels down and never inside a
    context folder: (those holding NICO++ split files, the label mapping, context folders)."""
    splits, mappings, images = [], [], []
    queue, visited = [(root, 0)], 0
    while queue and visited < 500:
        d, level = queue.pop(0)
        visited += 1
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        names = {e.name for e in entries}
        if any(f"{c}_train.txt" in names for c in NICOPP_DOMAINS):
            splits.append(d)
        if NICOPP_MAPPING in names:
            mappings.append(d)
        subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        if any(e.name in NICOPP_DOMAINS for e in subdirs):
            images.append(d)
        if level < depth:
            queue += [(e.path, level + 1) for e in subdirs if e.name not in NICOPP_DOMAINS]
    return splits, mappings, images


def list_nicopp(root: str, domains: Optional[list[str]], num_classes: int, splits: Optional[str] = None,
                split_seed: int = 0) -> Listing:
    """NICO++ (its six common contexts as domains), found as it is distributed:

    - the DG benchmark: `NICO_DG/<context>/<class>/<file>` and annotation files `<context>_{train,test}.txt`
      (paths `NICO_DG/...`, labels 0..59) in their own folder beside it (`NICO_DG_official/`,
      `DG_Benchmark/NICO_DG_Benchmark_annotation/`, ...), anywhere up to three levels under --data-root;
    - the challenge download: `<context>/<class>/*.jpg` (e.g. under `public_dg_0416/train/`) and
      `dg_label_id_mapping.json` (class -> label), no split files: then each (context, class) is split
      train/test (NICOPP_TEST_FRACTION) by `split_seed`, the same split for every run seed.
    """
    domains = _domains("nicopp", domains)
    where = DATASETS["nicopp"][2]
    if not root or not os.path.isdir(root):
        raise DataError(f"--data-root {root!r} is not a directory; point it at the folder you extracted NICO++ into "
                        f"(the one holding NICO_DG/ and its annotation folder, or dg_label_id_mapping.json) ({where})")
    found_splits, mappings, images = _survey(root, 3)
    if os.path.abspath(root) in map(os.path.abspath, images) and not (found_splits or mappings):
        found_splits, mappings, _ = _survey(os.path.dirname(os.path.abspath(root)), 2)   # root is NICO_DG itself
    if not images:
        raise DataError(f"no NICO++ images under {root}: expected context folders ({', '.join(NICOPP_DOMAINS)}) "
                        f"holding <class>/<image>, e.g. NICO_DG/autumn/airplane/ ({where})")
    split_dir = splits or (found_splits[0] if found_splits else None)
    if split_dir:
        items, lines = _read_splits("nicopp", num_classes, split_dir, domains)
        first = items[domains[0]]["train"][:1] or items[domains[0]]["test"][:1]
        image_root = next((d for d in images if first and os.path.exists(os.path.join(d, first[0][0]))), images[0])
        return Listing("nicopp", image_root, split_dir, items, lines, num_classes)
    if not mappings:
        raise DataError(f"no NICO++ split files (<context>_train.txt) and no {NICOPP_MAPPING} under {root}; the DG "
                        f"benchmark ships annotation files beside NICO_DG/, the challenge download ships {NICOPP_MAPPING} "
                        f"({where})")
    return _make_nicopp_split(os.path.join(mappings[0], NICOPP_MAPPING), images[0], domains, num_classes, split_seed)


def _make_nicopp_split(mapping_path: str, image_root: str, domains: list[str], num_classes: int,
                       seed: int) -> Listing:
    """Class-stratified train/test split of every context: the same files and seed, the same split."""
    with open(mapping_path, encoding="utf-8-sig") as f:
        mapping = json.load(f)
    total = DATASETS["nicopp"][1]
    if not isinstance(mapping, dict) or not all(isinstance(v, int) and 0 <= v < total for v in mapping.values()):
        raise DataError(f"{mapping_path}: expected {{\"class name\": label}} with labels 0..{total - 1}")
    items, lines = {}, 0
    for d in domains:
        items[d] = {"train": [], "test": []}
        folder = os.path.join(image_root, d)
        if not os.path.isdir(folder):
            raise DataError(f"context folder {folder} is missing: the NICO++ download was not fully extracted")
        for cls in sorted(os.listdir(folder)):
            if cls not in mapping:
                raise DataError(f"{folder}/{cls}: class folder not in {mapping_path}")
            files = sorted(x for x in os.listdir(os.path.join(folder, cls)) if x.lower().endswith(IMAGE_EXTENSIONS))
            random.Random(f"{seed}/{d}/{cls}").shuffle(files)
            n_test = max(1, round(NICOPP_TEST_FRACTION * len(files))) if len(files) > 1 else 0
            lines += len(files)
            if mapping[cls] >= num_classes:
                continue
            for i, x in enumerate(files):
                items[d]["test" if i < n_test else "train"].append((f"{d}/{cls}/{x}", mapping[cls]))
        for split in items[d].values():
            split.sort()
    return Listing("nicopp", image_root, None, items, lines, num_classes)


def write_splits(listing: Listing, directory: str) -> None:
    """The listing as split files `<domain>_{train,test}.txt` (paths under its image root), e.g. to
    reuse a split made here with --splits."""
    os.makedirs(directory, exist_ok=True)
    for d, splits in listing.items.items():
        for split, items in splits.items():
            with open(os.path.join(directory, f"{d}_{split}.txt"), "w", encoding="utf-8") as f:
                f.writelines(f"{rel} {y}\n" for rel, y in items)


def check_images(listing: Listing) -> None:
    """Every listed image must exist: one directory listing per folder (no decoding). Missing
    files stop the run here, with the likely fix, instead of turning into 0% accuracy later."""
    root, present, missing = listing.image_root, {}, {}
    first = None
    for d, splits in listing.items.items():
        for items in splits.values():
            for rel, _ in items:
                folder, name = os.path.split(rel)
                if folder not in present:
                    try:
                        present[folder] = set(os.listdir(os.path.join(root, folder)))
                    except OSError:
                        present[folder] = set()
                if name not in present[folder]:
                    missing[d] = missing.get(d, 0) + 1
                    first = first or rel
    if not missing:
        return
    total = listing.kept
    n = sum(missing.values())
    found = _nearby(root, first)
    hint = _level_hint(root, found)
    if found and listing.split_dir and not os.path.abspath(listing.split_dir).startswith(os.path.abspath(found)):
        hint += f" --splits {listing.split_dir}"
    if not hint:
        domain = first.split("/")[0]
        hint = (f"; {os.path.join(root, domain)} does not exist: extract {domain}'s images there"
                if not os.path.isdir(os.path.join(root, domain)) else
                "; the download or extraction looks incomplete (missing per domain: "
                + ", ".join(f"{d} {k}" for d, k in missing.items()) + ")")
    raise DataError(f"{n} of {total} listed images are missing under {root} (first: {os.path.join(root, first)}){hint}")


class ImageList(Dataset):
    """Images listed by (path under root, label). A file that cannot be decoded yields label -1:
    left out of the loss and of accuracy, and counted by the caller, instead of crashing a round."""

    def __init__(self, root: str, items: list[tuple[str, int]], transform=None):
        self.root, self.items, self.transform = root, items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        rel, label = self.items[i]
        try:
            with Image.open(os.path.join(self.root, rel)) as im:
                return self.transform(im.convert("RGB")), label
        except (OSError, ValueError, SyntaxError):     # PIL raises SyntaxError for some broken headers
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


def image_domains(listing: Listing, transform=None) -> list[DomainData]:
    """DomainData per listed domain (the transform may be set later, once the model is known)."""
    out = []
    for d, splits in listing.items.items():
        if not splits["train"] or not splits["test"]:
            raise DataError(f"{listing.dataset} domain {d}: no {'training' if not splits['train'] else 'test'} images "
                            f"with label < {listing.num_classes}")
        out.append(DomainData(d, ImageList(listing.image_root, splits["train"], transform),
                              ImageList(listing.image_root, splits["test"], transform),
                              [y for _, y in splits["train"]]))
    return out


def list_images(dataset: str, root: str, domains: Optional[list[str]], num_classes: int,
                splits: Optional[str] = None, split_seed: int = 0) -> Listing:
    """The listing of DomainNet or NICO++, every listed image checked to exist."""
    total = DATASETS[dataset][1]
    if not 0 < num_classes <= total:
        raise DataError(f"--num-classes must be in 1..{total} for {dataset}, got {num_classes}")
    if splits and not os.path.isdir(splits):
        raise DataError(f"--splits {splits} is not a directory (it should hold <domain>_train.txt, <domain>_test.txt)")
    listing = (list_domainnet(root, domains, num_classes, splits) if dataset == "domainnet" else
               list_nicopp(root, domains, num_classes, splits, split_seed))
    check_images(listing)
    return listing


# ----------------------------------------------------------------------------- embedded "shapes"

SHAPES_SIZE = 32
SHAPES_CLASSES = 10          # federated task: classes 0..9
PRETRAIN_CLASSES = (10, 40)  # backbone pretraining: classes 10..39, disjoint from the task
SHAPES_MAX_CLASSES = 100     # a task takes 0..9, then 40.. (shapes_task_classes)


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


def shapes_task_classes(num_classes: int = SHAPES_CLASSES) -> list[int]:
    """The generator's class ids of a task with `num_classes` classes: 0..9, then 40, 41, ... so
    that no task class is one the backbone was pretrained on (PRETRAIN_CLASSES, 10..39)."""
    if not 2 <= num_classes <= SHAPES_MAX_CLASSES:
        raise DataError(f"--num-classes on shapes must be in 2..{SHAPES_MAX_CLASSES}, got {num_classes}")
    low = list(range(min(num_classes, PRETRAIN_CLASSES[0])))
    return low + list(range(PRETRAIN_CLASSES[1], PRETRAIN_CLASSES[1] + num_classes - len(low)))


def shapes_split(domain: int, n: int, classes: Sequence[int], seed: int) -> tuple[Tensor, Tensor]:
    """n balanced samples of the generator's class ids `classes` in one domain, drawn from `seed`:
    x (n, 3, 32, 32) and labels y (n,), the position of each sample's class in `classes`."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(classes)
    y = y[torch.randperm(n, generator=g)]
    return render_shapes(torch.tensor(list(classes))[y], domain, g), y


def load_shapes(domains: list[str] | None, n_train: int, n_test: int, seed: int = 0,
                num_classes: int = SHAPES_CLASSES) -> list[DomainData]:
    """The embedded dataset: `num_classes` classes (default 10) x 6 styles. Same seed, same pixels
    (the data seed is fixed per domain and split, independent of the run's seed, so every run sees
    the same dataset; the first 10 classes' images do not depend on num_classes)."""
    domains = list(domains or SHAPES_DOMAINS)
    classes = shapes_task_classes(num_classes)
    out = []
    for d in domains:
        if d not in SHAPES_DOMAINS:
            raise DataError(f"unknown shapes domain {d!r}; choose from {', '.join(SHAPES_DOMAINS)}")
        i = SHAPES_DOMAINS.index(d)
        xtr, ytr = shapes_split(i, n_train, classes, seed=1000 + 2 * i)
        xte, yte = shapes_split(i, n_test, classes, seed=1001 + 2 * i)
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
