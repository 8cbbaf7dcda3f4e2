"""Loaders on DomainNet / NICO++ trees laid out as distributed (tests/layouts.py); bad inputs;
partitions; the embedded dataset."""
import os
import shutil

import pytest
import torch
from PIL import Image

from data import (DataError, ImageList, _Transform, check_images, image_domains, list_images, load_shapes,
                  partition, render_shapes, write_splits)
from tests import layouts

T = _Transform(8, (0.5,) * 3, (0.5,) * 3)


def red_label(root, rel):
    with Image.open(os.path.join(root, rel)) as im:
        return round(im.convert("RGB").getpixel((0, 0))[0] / 8)


def test_domainnet_as_downloaded(tmp_path):
    root = layouts.domainnet(str(tmp_path / "domainnet"))
    lst = list_images("domainnet", root, ["clipart", "sketch"], 100)
    assert lst.image_root == root and lst.split_dir == root and lst.kept == lst.lines == 2 * 4 * 4
    assert lst.items["clipart"]["train"][0] == ("clipart/aircraft_carrier/clipart_001_000001.jpg", 0)
    for d, splits in lst.items.items():           # every file carries the label its line gives
        for rel, y in splits["train"] + splits["test"]:
            assert rel.startswith(d + "/") and red_label(root, rel) == y
    doms = image_domains(lst, T)
    assert [d.name for d in doms] == ["clipart", "sketch"] and len(doms[1].train) == 12 and len(doms[1].test) == 4
    x, y = doms[1].train[5]
    assert x.shape == (3, 8, 8) and y == 1 and doms[0].train_labels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_domainnet_class_filter_is_reported_and_splits_folder(tmp_path):
    root = layouts.domainnet(str(tmp_path), splits_dir=str(tmp_path / "splits"))
    lst = list_images("domainnet", str(tmp_path), ["clipart", "sketch"], 2)
    assert lst.split_dir == os.path.join(root, "splits")
    assert (lst.kept, lst.lines) == (16, 32) and all(y < 2 for s in lst.items.values() for v in s.values() for _, y in v)
    assert "kept 16 of 32 lines (classes 0..1 of 345; --num-classes 345 keeps all)" in lst.summary()
    with pytest.raises(DataError, match="--num-classes must be in 1..345"):
        list_images("domainnet", root, None, 400)


def test_split_lines_bom_crlf_tabs_and_spaces(tmp_path):
    layouts.nicopp_dg(str(tmp_path), contexts=("autumn",))
    ann = tmp_path / "NICO_DG_official" / "autumn_train.txt"
    lines = ann.read_text().splitlines()
    # a BOM, Windows line ends, and a tab instead of the space before the label
    ann.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines[:-1] + [lines[-1].replace(" 29", "\t29")]).encode() + b"\r\n")
    lst = list_images("nicopp", str(tmp_path), ["autumn"], 60)
    train = lst.items["autumn"]["train"]
    assert train[0] == ("autumn/airplane/autumn_000000.jpg", 0)              # the BOM did not stick to the path
    assert train[-1] == ("autumn/hot air balloon/autumn_290001.jpg", 29)     # spaces kept, tab split off
    assert len(train) == 8 and all(red_label(lst.image_root, r) == y for r, y in train)


@pytest.mark.parametrize("line, message", [
    ("clipart/airplane/clipart_002_000001.jpg -1", r"clipart_train.txt:2: label -1 is outside 0..344"),
    ("clipart/airplane/clipart_002_000001.jpg 345", r"clipart_train.txt:2: label 345 is outside 0..344"),
    ("clipart/airplane/clipart_002_000001.jpg", r"clipart_train.txt:2: expected 'relative/path label'"),
    ("sketch/airplane/sketch_002_000001.jpg 1", r"clipart_train.txt:2: path .* has no 'clipart/' folder"),
    ("clipart/aircraft_carrier/clipart_001_000002.jpg 3", r"clipart_train.txt:2: class folder 'aircraft_carrier' "
                                                          r"has label 3 here but 0 at .*clipart_train.txt:1"),
])
def test_bad_split_lines_name_file_and_line(tmp_path, line, message):
    root = layouts.domainnet(str(tmp_path), domains=("clipart",))
    first = (tmp_path / "clipart_train.txt").read_text().splitlines()[0]
    (tmp_path / "clipart_train.txt").write_text(f"{first}\n{line}\n")
    with pytest.raises(DataError, match=message):
        list_images("domainnet", root, ["clipart"], 100)


@pytest.mark.parametrize("annotation_dir, images_dir, point_at", [
    ("NICO_DG_official", "NICO_DG", "."),                                       # annotation folder beside NICO_DG
    ("DG_Benchmark/NICO_DG_Benchmark_annotation", "DG_Benchmark/NICO_DG", "."),  # as the Dropbox zips extract
    ("DG_Benchmark/NICO_DG_Benchmark_annotation", "DG_Benchmark/NICO_DG_Benchmark", "."),
    ("NICO_DG_official", "NICO_DG", "NICO_DG"),                                 # --data-root at NICO_DG itself
])
def test_nicopp_dg_benchmark_wherever_the_annotations_sit(tmp_path, annotation_dir, images_dir, point_at):
    layouts.nicopp_dg(str(tmp_path), annotation_dir, images_dir)
    lst = list_images("nicopp", str(tmp_path / point_at), ["autumn", "rock"], 60)
    assert os.path.samefile(lst.split_dir, tmp_path / annotation_dir)
    assert os.path.samefile(lst.image_root, tmp_path / images_dir)
    assert lst.kept == lst.lines == 2 * 4 * 3
    labels = sorted({y for s in lst.items.values() for v in s.values() for _, y in v})
    assert labels == [0, 1, 18, 29]
    for ctx, splits in lst.items.items():
        assert len(splits["train"]) == 8 and len(splits["test"]) == 4
        assert all(r.startswith(ctx + "/") and red_label(lst.image_root, r) == y for r, y in splits["train"])


def test_nicopp_challenge_download_gets_a_seeded_stratified_split(tmp_path):
    root = layouts.nicopp_challenge(str(tmp_path))
    a = list_images("nicopp", root, ["autumn", "rock"], 60, split_seed=0)
    assert a.split_dir is None and os.path.samefile(a.image_root, tmp_path / "public_dg_0416" / "train")
    assert a.lines == a.kept == 2 * 4 * 5
    for ctx in ("autumn", "rock"):
        train, test = a.items[ctx]["train"], a.items[ctx]["test"]
        assert not set(train) & set(test) and len(train) + len(test) == 20
        for label in (0, 1, 18, 29):       # stratified: 1 of the 5 images of every class held out (20%)
            assert sum(y == label for _, y in test) == 1 and sum(y == label for _, y in train) == 4
        assert all(red_label(a.image_root, r) == y for r, y in train + test)
    assert list_images("nicopp", root, ["autumn", "rock"], 60, split_seed=0).items == a.items
    b = list_images("nicopp", root, ["autumn", "rock"], 60, split_seed=1)
    assert b.items != a.items
    # written out, the split reads back as split files with the same items
    write_splits(a, str(tmp_path / "out" / "splits"))
    c = list_images("nicopp", root, ["autumn", "rock"], 60, splits=str(tmp_path / "out" / "splits"))
    assert c.split_dir == str(tmp_path / "out" / "splits") and c.items == a.items


def test_nicopp_not_found(tmp_path):
    with pytest.raises(DataError, match="no NICO\\+\\+ images under"):
        list_images("nicopp", str(tmp_path), None, 60)
    layouts.nicopp_challenge(str(tmp_path))
    os.remove(tmp_path / "dg_label_id_mapping.json")
    with pytest.raises(DataError, match="no NICO\\+\\+ split files .* and no dg_label_id_mapping.json"):
        list_images("nicopp", str(tmp_path), None, 60)


def test_wrong_data_root_says_which_way(tmp_path):
    root = layouts.domainnet(str(tmp_path / "data" / "domainnet"), domains=("clipart",))
    with pytest.raises(DataError, match=f"one level too high: pass --data-root {root}$"):
        list_images("domainnet", str(tmp_path / "data"), ["clipart"], 100)
    with pytest.raises(DataError, match=f"one level too low: pass --data-root {root}$"):
        list_images("domainnet", os.path.join(root, "clipart"), ["clipart"], 100)
    with pytest.raises(DataError, match="not a directory"):
        list_images("domainnet", str(tmp_path / "nope"), None, 100)
    # split files at the top, images extracted one folder deeper
    top = tmp_path / "top"
    layouts.domainnet(str(top / "images"), domains=("clipart",), splits_dir=str(top))
    with pytest.raises(DataError, match=r"16 of 16 listed images are missing .*one level too high: pass "
                                        rf"--data-root {top}/images --splits {top}$"):
        list_images("domainnet", str(top), ["clipart"], 100)


def test_partial_extraction_stops_before_training(tmp_path):
    root = layouts.domainnet(str(tmp_path), domains=("clipart", "sketch"))
    shutil.rmtree(tmp_path / "sketch" / "airplane")
    os.remove(tmp_path / "clipart" / "alarm_clock" / "clipart_003_000004.jpg")
    with pytest.raises(DataError) as e:
        list_images("domainnet", root, ["clipart", "sketch"], 100)
    msg = str(e.value)
    assert "5 of 32 listed images are missing" in msg and "\n" not in msg
    assert "first: " + os.path.join(root, "clipart/alarm_clock/clipart_003_000004.jpg") in msg
    assert "incomplete (missing per domain: clipart 1, sketch 4)" in msg
    shutil.rmtree(tmp_path / "sketch")
    with pytest.raises(DataError, match=f"{os.path.join(root, 'sketch')} does not exist: extract sketch's images"):
        list_images("domainnet", root, ["sketch"], 100)


def test_unreadable_image_is_marked_not_raised(tmp_path):
    root = layouts.domainnet(str(tmp_path), domains=("clipart",))
    lst = list_images("domainnet", root, ["clipart"], 100)
    bad = lst.items["clipart"]["train"][4][0]
    (tmp_path / bad).write_bytes(b"<html>rate limited</html>")
    check_images(lst)                                   # it exists, so the early check passes
    ds = ImageList(root, lst.items["clipart"]["train"], T)
    labels = [ds[i][1] for i in range(len(ds))]
    expected = [y for _, y in lst.items["clipart"]["train"]]
    assert labels[4] == -1 and labels[:4] + labels[5:] == expected[:4] + expected[5:]


def test_shapes_is_deterministic_and_balanced():
    a, b = load_shapes(["clipart", "sketch"], 40, 20), load_shapes(["clipart", "sketch"], 40, 20)
    assert torch.equal(a[1].train.x, b[1].train.x) and a[0].train_labels == b[0].train_labels
    assert sorted(a[0].train_labels) == sorted(list(range(10)) * 4)
    assert not torch.equal(a[0].train.x, a[1].train.x)
    x = render_shapes(torch.arange(10), 3, torch.Generator().manual_seed(0))
    assert x.shape == (10, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    with pytest.raises(DataError, match="unknown shapes domain"):
        load_shapes(["photo"], 10, 10)


def test_shapes_with_more_classes_never_uses_the_pretraining_classes():
    from data import PRETRAIN_CLASSES, shapes_task_classes
    assert shapes_task_classes(10) == list(range(10))
    assert shapes_task_classes(30) == list(range(10)) + list(range(40, 60))
    assert not set(shapes_task_classes(100)) & set(range(*PRETRAIN_CLASSES))
    assert shapes_task_classes(4) == [0, 1, 2, 3]
    many = load_shapes(["painting"], 60, 30, num_classes=30)[0]
    assert sorted(many.train_labels) == sorted(list(range(30)) * 2)
    x, y = many.test.x, many.test.y
    assert x.shape == (30, 3, 32, 32) and sorted(y.tolist()) == list(range(30))
    from data import render_shapes                    # label 12 is drawn as the generator's class 42
    g = torch.Generator().manual_seed(5)
    assert torch.equal(render_shapes(torch.tensor([42]), 2, g), render_shapes(
        torch.tensor([shapes_task_classes(30)[12]]), 2, torch.Generator().manual_seed(5)))
    with pytest.raises(DataError, match="must be in 2..100"):
        load_shapes(["painting"], 10, 10, num_classes=101)


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
