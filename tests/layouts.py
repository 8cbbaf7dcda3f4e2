"""Tiny image datasets laid out exactly as DomainNet and NICO++ are distributed.

DomainNet (http://ai.bu.edu/M3SDA/): one zip per domain extracting to `<domain>/<class>/<file>`,
files named `<domain>_<class index, 1-based, 3 digits>_<6 digits>.jpg`, and split files
`<domain>_{train,test}.txt` with lines `clipart/aircraft_carrier/clipart_001_000018.jpg 0`.

NICO++ DG benchmark: images `NICO_DG/<context>/<class>/<file>` (class names with spaces), and
annotation files `<context>_{train,test}.txt` whose paths start with `NICO_DG/` and whose labels
come from `dg_label_id_mapping.json`, shipped in a folder of their own beside `NICO_DG/`.
NICO++ challenge download: `dg_label_id_mapping.json` and `public_dg_0416/train/<context>/<class>/`
(plus unlabelled test images in `public_dg_0416/public_test_flat/`), no split files.

Every image is a small JPEG of one colour whose red channel encodes its label (`8 * label`), so a
test can check that labels and files stay paired.
"""
import json
import os

from PIL import Image

DOMAINNET_CLASSES = ["aircraft_carrier", "airplane", "alarm_clock", "ambulance"]       # labels 0..3
NICOPP_CLASSES = {"airplane": 0, "bear": 1, "fishing rod": 18, "hot air balloon": 29}  # as in the mapping file


def image(path, label: int, size=(20, 14)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (8 * label, 90, 160)).save(path, format="PNG" if path.endswith(".png") else "JPEG",
                                                     quality=100)


def domainnet(root, domains=("clipart", "sketch"), classes=DOMAINNET_CLASSES, per_class=4, splits_dir=None):
    """<root>/<domain>/<class>/<domain>_<ccc>_<nnnnnn>.jpg; the last image of each class is a test image."""
    splits_dir = splits_dir or root
    os.makedirs(splits_dir, exist_ok=True)
    for d in domains:
        lines = {"train": [], "test": []}
        for c, name in enumerate(classes):
            for i in range(per_class):
                rel = f"{d}/{name}/{d}_{c + 1:03d}_{i + 1:06d}.jpg"
                image(os.path.join(root, rel), c)
                lines["train" if i < per_class - 1 else "test"].append(f"{rel} {c}")
        for split, ls in lines.items():
            with open(os.path.join(splits_dir, f"{d}_{split}.txt"), "w", newline="\n") as f:
                f.write("\n".join(ls) + "\n")
    return root


def _nicopp_images(image_root, contexts, classes, per_class):
    files = {}
    for ctx in contexts:
        for name, label in classes.items():
            for i in range(per_class):
                rel = f"{ctx}/{name}/{ctx}_{label:02d}{i:04d}.jpg"
                image(os.path.join(image_root, rel), label)
                files.setdefault(ctx, []).append((rel, label))
    return files


def nicopp_dg(root, annotation_dir="NICO_DG_official", images_dir="NICO_DG", contexts=("autumn", "rock"),
              classes=NICOPP_CLASSES, per_class=3):
    """NICO_DG/<context>/<class>/<file> and <annotation_dir>/<context>_{train,test}.txt, paths 'NICO_DG/...'."""
    files = _nicopp_images(os.path.join(root, images_dir), contexts, classes, per_class)
    ann = os.path.join(root, annotation_dir)
    os.makedirs(ann, exist_ok=True)
    for ctx, items in files.items():
        for split in ("train", "test"):
            keep = [(r, y) for i, (r, y) in enumerate(items) if (i % per_class == per_class - 1) == (split == "test")]
            with open(os.path.join(ann, f"{ctx}_{split}.txt"), "w") as f:
                f.writelines(f"NICO_DG/{r} {y}\n" for r, y in keep)
    with open(os.path.join(root, "dg_label_id_mapping.json"), "w") as f:
        json.dump(classes, f)
    return root


def nicopp_challenge(root, contexts=("autumn", "rock"), classes=NICOPP_CLASSES, per_class=5):
    """dg_label_id_mapping.json + public_dg_0416/train/<context>/<class>/ + public_test_flat/, no split files."""
    _nicopp_images(os.path.join(root, "public_dg_0416", "train"), contexts, classes, per_class)
    for i in range(3):
        image(os.path.join(root, "public_dg_0416", "public_test_flat", f"{i:032x}.jpg"), 0)
    with open(os.path.join(root, "dg_label_id_mapping.json"), "w") as f:
        json.dump(classes, f)
    return root
