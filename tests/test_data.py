"""Loaders on a fake DomainNet / NICO++ tree of generated JPEGs; partitions; the embedded dataset."""
import pytest
import torch
from PIL import Image

from data import (DataError, _Transform, load_image_domains, load_shapes, partition, read_split,
                  render_shapes)


def fake_tree(root, domains, classes, per_class=3, corrupt=None):
    """<root>/<domain>/<class>/<i>.jpg plus <domain>_train.txt / _test.txt ('relative/path label')."""
    for d in domains:
        lines = {"train": [], "test": []}
        for c, name in enumerate(classes):
            (root / d / name).mkdir(parents=True)
            for i in range(per_class):
                rel = f"{d}/{name}/{i}.jpg"
                Image.new("RGB", (20, 12), (40 * c, 10 * i, 200)).save(root / rel)
                lines["train" if i < per_class - 1 else "test"].append(f"{rel} {c}")
        for split, ls in lines.items():
            (root / f"{d}_{split}.txt").write_text("\n".join(ls) + "\n")
    if corrupt:
        (root / corrupt).write_bytes(b"not a jpeg")
    return root


def test_domainnet_loader(tmp_path):
    root = fake_tree(tmp_path, ["clipart", "sketch"], ["aircraft_carrier", "airplane", "alarm_clock"])
    doms = load_image_domains(str(root), "domainnet", ["clipart", "sketch"], 2,
                              _Transform(16, (0.5,) * 3, (0.5,) * 3))
    assert [d.name for d in doms] == ["clipart", "sketch"]
    assert len(doms[0].train) == 2 * 2 and len(doms[0].test) == 2    # class 2 dropped by num_classes=2
    x, y = doms[1].train[3]
    assert x.shape == (3, 16, 16) and y == 1
    assert doms[0].train_labels == [0, 0, 1, 1]


def test_nicopp_class_names_with_spaces_and_corrupt_image(tmp_path):
    root = fake_tree(tmp_path, ["autumn"], ["hot air balloon", "sailboat"], corrupt="autumn/sailboat/0.jpg")
    items = read_split(str(root), "autumn", "train", 60)
    assert items[0] == ("autumn/hot air balloon/0.jpg", 0)
    (dom,) = load_image_domains(str(root), "nicopp", ["autumn"], 60, _Transform(8, (0.5,) * 3, (0.5,) * 3))
    labels = [dom.train[i][1] for i in range(len(dom.train))]
    assert labels == [0, 0, -1, 1]                                  # the corrupt file is marked, not raised


def test_loader_errors(tmp_path):
    t = _Transform(8, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DataError, match="not a directory.*<domain>_train.txt.*M3SDA"):
        load_image_domains(str(tmp_path / "nope"), "domainnet", None, 100, t)
    with pytest.raises(DataError, match="missing split file .*clipart_train.txt"):
        load_image_domains(str(tmp_path), "domainnet", ["clipart"], 100, t)
    with pytest.raises(DataError, match="unknown nicopp domain 'clipart'.*autumn"):
        load_image_domains(str(tmp_path), "nicopp", ["clipart"], 60, t)
    (tmp_path / "real_train.txt").write_text("justapath\n")
    with pytest.raises(DataError, match="real_train.txt:1"):
        read_split(str(tmp_path), "real", "train", 100)


def test_shapes_is_deterministic_and_balanced():
    a, b = load_shapes(["clipart", "sketch"], 40, 20), load_shapes(["clipart", "sketch"], 40, 20)
    assert torch.equal(a[1].train.x, b[1].train.x) and a[0].train_labels == b[0].train_labels
    assert sorted(a[0].train_labels) == sorted(list(range(10)) * 4)
    assert not torch.equal(a[0].train.x, a[1].train.x)
    x = render_shapes(torch.arange(10), 3, torch.Generator().manual_seed(0))
    assert x.shape == (10, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    with pytest.raises(DataError, match="unknown shapes domain"):
        load_shapes(["photo"], 10, 10)


def test_feature_non_iid_is_one_client_per_domain():
    doms = load_shapes(["clipart", "sketch", "real"], 30, 10)
    parts = partition(doms)
    assert [(d, len(idx)) for d, idx in parts] == [(0, 30), (1, 30), (2, 30)]


def test_dirichlet_partition_sizes_seeds_and_minimum():
    doms = load_shapes(["clipart", "sketch"], 200, 10)
    parts = partition(doms, clients_per_domain=5, alpha=0.5, min_size=10, seed=1)
    assert len(parts) == 10 and all(len(idx) >= 10 for _, idx in parts)
    for d in range(2):   # a partition of each domain: disjoint and complete
        idx = sorted(i for dd, ids in parts if dd == d for i in ids)
        assert idx == list(range(200))
    assert parts == partition(doms, clients_per_domain=5, alpha=0.5, min_size=10, seed=1)
    assert parts != partition(doms, clients_per_domain=5, alpha=0.5, min_size=10, seed=2)
    # label skew: with alpha = 0.5 some client's label histogram is far from uniform
    labels = doms[0].train_labels
    top = max(max(torch.bincount(torch.tensor([labels[i] for i in ids]), minlength=10)).item() / len(ids)
              for d, ids in parts if d == 0)
    assert top > 0.2
    with pytest.raises(DataError, match="too few for 30 clients"):
        partition(doms, clients_per_domain=30, min_size=10)
