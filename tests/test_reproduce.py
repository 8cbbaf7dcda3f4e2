"""bench/reproduce.py's comparison of a rerun with a committed run: what counts as a difference."""
import json

from bench.reproduce import CELLS, differences


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def record(t, acc, eq8=0.5, seconds=1.0):
    return {"round": t, "acc": {"mean": acc}, "eq8": eq8, "layers": {"blocks.0.mlp.fc2": {"eq8": eq8, "cos": 0.9}},
            "seconds": {"train": seconds}}


def test_timings_alone_are_no_difference_and_every_other_field_is(tmp_path):
    old = write(tmp_path / "old.jsonl", [record(1, 0.5), record(2, 0.6)])
    assert differences(old, write(tmp_path / "a.jsonl", [record(1, 0.5, seconds=9.0), record(2, 0.6, seconds=3.0)])) \
        == ([], 0.0)
    fields, worst = differences(old, write(tmp_path / "b.jsonl", [record(1, 0.5), record(2, 0.6, eq8=0.5 + 1e-12)]))
    assert fields == ["eq8", "layers.*.eq8"] and abs(worst - 2e-12) < 1e-15
    assert differences(old, write(tmp_path / "c.jsonl", [record(1, 0.5), record(2, 0.61)]))[0] == ["acc.mean"]
    assert differences(old, write(tmp_path / "d.jsonl", [record(1, 0.5)]))[0] == ["rounds"]
    extra = record(2, 0.6)
    extra["dropped"] = [3]                                                  # a field the committed run lacks
    assert differences(old, write(tmp_path / "e.jsonl", [record(1, 0.5), extra]))[0] == ["dropped"]


def test_every_committed_cell_has_a_run_to_reproduce():
    import os
    from bench import compare
    root = os.path.join(os.path.dirname(__file__), "..", "bench", "results")
    for cell_args, variant in CELLS:
        args, extra = compare.get_args_parser().parse_known_args([*cell_args, "--only", variant, "--seeds", "0",
                                                                  "--out", root])
        (_, _, out), = compare.cell(args, extra, args.setting, args.backbone)[0]
        assert os.path.isfile(os.path.join(out, "metrics.jsonl")), out
