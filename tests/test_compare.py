"""bench/compare.py: a run is reused only when its recorded settings equal the requested ones;
paired differences and their intervals."""
import pytest

from bench import compare
from tests.test_train import TINY


def test_a_run_is_reused_only_with_the_same_settings(tmp_path, capsys):
    out = str(tmp_path / "fedit" / "seed0")
    argv = [*TINY, "--method", "fedit", "--rounds", "1", "--seed", "0"]
    first = compare.plan("fedit", argv, out)
    assert "--resume" not in first
    compare.run_all([("fedit", argv, out)], 1)
    assert [r["round"] for r in compare.metrics(out)] == [1]
    assert compare.plan("fedit", [*argv, "--workers", "0"], out) is None        # device settings: reused
    assert "reusing" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(lr: 0.05 there, 0.1 asked\)"):
        compare.plan("fedit", [*argv, "--lr", "0.1"], out)
    more = [*TINY, "--method", "fedit", "--rounds", "2", "--seed", "0"]
    assert "--resume" in compare.plan("fedit", more, out)                     # asked for more rounds: continued
    first_round = compare.metrics(out)[0]
    compare.run_all([("fedit", more, out)], 1)
    assert [r["round"] for r in compare.metrics(out)] == [1, 2] and compare.metrics(out)[0] == first_round
    import os                                                               # as committed: config and metrics only
    for name in os.listdir(out):
        if name not in ("config.json", "metrics.jsonl"):
            path = os.path.join(out, name)
            os.remove(path) if os.path.isfile(path) else __import__("shutil").rmtree(path)
    assert compare.plan("fedit", more, out) is None                         # rebuilt from them, not rerun
    with pytest.raises(SystemExit, match="holds a run of 2 rounds, 1 asked"):
        compare.plan("fedit", argv, out)


def test_a_table_is_never_replaced_by_one_of_fewer_seeds_or_variants(tmp_path):
    head = "shapes, setting feature, backbone vit: {} seeds ({}), top-1 % ...\n\n| method | x |\n|---|---|\n"
    (tmp_path / "table.md").write_text(head.format(5, "0,1,2,3,4") + "| fedit | 1 |\n| hetlora (aggregation step only) | 2 |\n")
    assert compare.keeps_a_fuller_table(str(tmp_path), [0, 1], ["fedit", "hetlora"])        # fewer seeds
    assert compare.keeps_a_fuller_table(str(tmp_path), [0, 1, 2, 3, 4], ["fedit"])          # fewer variants
    assert not compare.keeps_a_fuller_table(str(tmp_path), [0, 1, 2, 3, 4], ["fedit", "hetlora", "flora"])
    assert not compare.keeps_a_fuller_table(str(tmp_path / "none"), [0], ["fedit"])


def test_paired_difference_and_its_t_interval():
    base = [0.70, 0.72, 0.71, 0.69, 0.73]
    up = [b + d for b, d in zip(base, [0.010, 0.012, 0.008, 0.011, 0.009])]
    # differences 1.0, 1.2, 0.8, 1.1, 0.9 points: mean 1.0, sd 0.158, t(4) 2.776 -> half-width 0.196
    assert compare.paired(up, base) == "+1.00 [+0.80, +1.20] *"
    noisy = [b + d for b, d in zip(base, [0.02, -0.02, 0.01, -0.01, 0.0])]
    assert compare.paired(noisy, base).startswith("+0.00 [") and not compare.paired(noisy, base).endswith("*")


@pytest.mark.parametrize("setting,steps", [("feature", 180), ("label", 450), ("partial", 180)])
def test_a_settings_steps_a_round_are_its_clients_times_their_steps(setting, steps):
    # 6 clients x 30 steps; 30 x 15; 12 taking part of 60 x 15 (README's settings)
    assert compare.steps_a_round(compare.SETTINGS[setting]) == steps
    assert compare.steps_a_round([*compare.CENTRALISED, "--local-steps", str(steps)]) == steps   # one client


def planned(cells, out="bench/results"):
    """{key: the (name, argv, out) jobs compare.cell plans} for each (key, compare.py flags, setting); runs nothing."""
    return {key: compare.cell(compare.get_args_parser().parse_args([*flags, "--setting", setting, "--out", out]),
                              [], setting, "vit")[0] for key, flags, setting in cells}


def test_the_centralised_reference_takes_the_settings_steps_and_is_shared_where_they_agree():
    jobs = planned([(s, ["--seeds", "0,1"], s) for s in ("feature", "label", "partial")])
    ref = {k: [(argv, out) for name, argv, out in js if name == "centralised"] for k, js in jobs.items()}
    assert ref["feature"] == ref["partial"] and len(ref["feature"]) == 2      # one run per seed, used twice
    assert all("--centralised" in argv and argv[argv.index("--local-steps") + 1] == "180" and "steps" in out
               for argv, out in ref["feature"])
    label = ref["label"][0][0]
    assert label[label.index("--local-steps") + 1] == "450" and ref["label"][0][1] != ref["feature"][0][1]
    others = [argv for name, argv, out in jobs["label"] if name != "centralised"]
    assert others and all("--centralised" not in a and "--dirichlet" in a for a in others)


def test_the_ablations_reuse_the_comparisons_fedit_and_lorafair_runs():
    jobs = planned([("methods", ["--seeds", "0"], "feature"), ("ablations", ["--ablations", "--seeds", "0"], "feature")])
    methods = {name: (argv, out) for name, argv, out in jobs["methods"]}
    ablations = {name: (argv, out) for name, argv, out in jobs["ablations"]}
    assert ablations["fedit"] == methods["fedit"] and ablations["lorafair"] == methods["lorafair"]
    assert ablations["lorafair sgd"] == methods["lorafair sgd"]                  # the published SGD too
    assert "--fair-correct" in ablations["correct A"][0] and "ablations" in ablations["correct A"][1]


def test_all_runs_every_cell_in_one_pool_each_shared_run_once_longest_first(tmp_path, monkeypatch):
    ran, reported = [], []
    monkeypatch.setattr(compare, "plan", lambda name, argv, out: [*argv, "--out", out])   # nothing there yet
    monkeypatch.setattr(compare, "run_all", lambda jobs, parallel: ran.append(jobs))
    monkeypatch.setattr(compare, "metrics", lambda out: reported.append(out) or [{"round": 1}])
    for name in ("write_table", "write_curves", "plot", "series"):
        monkeypatch.setattr(compare, name, lambda *a, **k: None)
    compare.main(["--all", "--seeds", "0,1", "--out", str(tmp_path)])
    jobs, = ran                                                       # one pool for the four cells
    methods = sum(len(compare.PAPER[c]) for c in compare.ALL)
    centralised = {out for name, argv, out in jobs if name == "centralised"}
    assert len(centralised) == 3 * 2                                  # ViT 180 and 450 steps, Mixer 180: 2 seeds each
    assert len(jobs) == 2 * (methods + 4 + 4)                         # feature and partial plan the same reference;
    sgd = [argv for name, argv, _ in jobs if name == "lorafair sgd"]  # every cell's published-SGD row
    assert len(sgd) == 2 * 4 and all(a[a.index("--fair-solver") + 1] == "sgd" for a in sgd)
    assert all(out.startswith(str(tmp_path)) for _, _, out in jobs)
    assert not any(name.startswith("lorafair lsq") for name, _, _ in jobs)   # the closed form only when asked
    assert set(reported) == {out for _, _, out in jobs}               # every table reads what was planned
    ran.clear()
    compare.main(["--seeds", "0", "--closed-form", "--out", str(tmp_path)])
    assert {name for name, _, _ in ran[0]} >= set(compare.LSQ)

    order = []                                                        # run_all itself: each out once, longest first
    monkeypatch.undo()
    monkeypatch.setattr(compare, "plan", lambda name, argv, out: [*argv, "--out", out])
    monkeypatch.setattr(compare.subprocess, "run", lambda cmd, **k: order.append(cmd) or
                        type("Done", (), {"returncode": 0})())
    pretrained = []                                                   # each backbone once, before any run
    monkeypatch.setattr(compare, "pretrained_shapes_backbone", lambda model: pretrained.append((model, len(order))))
    compare.run_all(jobs, 1)
    assert sorted(pretrained) == [("mixer_shapes", 0), ("vit_shapes", 0)]
    assert len(order) == len({out for _, _, out in jobs})
    steps = [compare.steps_a_round(cmd[2:cmd.index("--out")]) for cmd in order]
    assert steps == sorted(steps, reverse=True) and steps[0] == 450
    with pytest.raises(SystemExit, match="two different runs planned into"):
        compare.run_all([("a", ["--lr", "0.1"], "x"), ("b", ["--lr", "0.2"], "x")], 1)


def test_only_picks_variants_by_name_and_refuses_unknown_ones():
    jobs = planned([("fair", ["--seeds", "0", "--only", "fedit,lorafair lsq lam 0"], "feature")])["fair"]
    assert [name for name, _, _ in jobs] == ["fedit", "lorafair lsq lam 0"]          # naming it implies --closed-form
    with pytest.raises(SystemExit, match=r"no variant 'fedti' here; the variants are fedit, ffa"):
        planned([("typo", ["--seeds", "0", "--only", "fedti"], "feature")])


def test_the_paper_regime_cell_runs_the_papers_lr_and_methods_with_its_own_centralised_reference():
    import train
    jobs = planned([("paper", ["--seeds", "0,1"], "paper")])["paper"]
    names = [name for name, _, _ in jobs]
    assert sorted(set(names)) == sorted(["fedit", "ffa", "flora", "flexlora", "lorafair", "lorafair sgd", "centralised",
                                         "fedsvd", "spectral", "frlora"])         # the paper's rows and the newer three
    assert len(jobs) == 10 * 2                                          # every row, every seed
    for name, argv, out in jobs:
        a = train.get_args_parser().parse_args(argv)                    # what train.py will see (later flags win)
        assert (a.lr, a.n_train, a.rounds, a.batch_size, a.clients_per_domain) == (0.01, 600, 1, 16, 1)
        assert a.local_steps == (3600 if name == "centralised" else 600)    # the same budget: 6 clients x 600
        assert out.startswith("bench/results/shapes-paper-vit/")        # its reference is not the stress cells'
        flags = [x for x in argv if x.startswith("--")]
        assert len(flags) == len(set(flags))                            # each setting stated once (the table's line)
    stress = planned([("feature", ["--seeds", "0"], "feature")])["feature"]
    assert all(train.get_args_parser().parse_args(argv).lr == 0.06 for _, argv, _ in stress if "--centralised" not in argv)


def test_the_dp_cells_run_fedit_ffa_lorafair_private_beside_the_cells_own_non_private_fedit():
    import train
    cells = [compare.cell(compare.get_args_parser().parse_args(["--setting", "paper", "--seeds", "0,1"]), [], "paper",
                          "vit", eps)[0] for eps in ("6", "1")]
    paper = {out for _, _, out in planned([("paper", ["--seeds", "0,1"], "paper")])["paper"]}
    for eps, jobs in zip(("6", "1"), cells):
        assert sorted({name for name, _, _ in jobs}) == ["fedit", "fedit non-private", "ffa", "lorafair"]
        for name, argv, out in jobs:
            a = train.get_args_parser().parse_args(argv)
            if name == "fedit non-private":           # the same runs as the paper cell's fedit: reused, not rerun
                assert a.dp_epsilon is None and out in paper and "/fedit/" in out
            else:
                assert a.dp_epsilon == float(eps) and out.startswith(f"bench/results/shapes-paper-vit-dp-eps{eps}/")
                assert (a.lr, a.local_steps, a.batch_size, a.n_train) == (0.01, 600, 16, 600)
    with pytest.raises(SystemExit, match="one client per style"):
        compare.cell(compare.get_args_parser().parse_args(["--setting", "label"]), [], "label", "vit", "6")


def test_table_headers_name_the_regime_and_are_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "backbone_note", lambda base: "")
    rec = [{"round": 1, "acc": {"a": 0.5, "mean": 0.5}, "cos": 0.9, "cos_fedit": 0.9, "ceiling": 0.95}]
    for setting, lr, words in [("paper", "0.01", "the paper's regime: client lr 0.01, 600 local steps"),
                               ("feature", "0.06", "STRESS TEST: client lr 0.06, the largest at which FedIT")]:
        args = compare.get_args_parser().parse_args(["--seeds", "0,1"])
        base = compare.with_flags(compare.SHAPES, compare.PAPER_REGIME if setting == "paper" else ["--lr", "0.06"])
        compare.write_table({"fedit": [rec, rec]}, [0, 1], str(tmp_path), args, setting, "vit", base,
                            compare.SETTINGS[setting])
        head = (tmp_path / "table.md").read_text().splitlines()[0]
        assert words in head and lr in head
        assert compare.keeps_a_fuller_table(str(tmp_path), [0], ["fedit"])        # 2 seeds read back from it
        assert not compare.keeps_a_fuller_table(str(tmp_path), [0, 1], ["fedit"])


def test_with_flags_states_each_flag_once():
    argv = ["--lr", "0.06", "--rounds", "5", "--amp"]
    assert compare.with_flags(argv, ["--lr", "0.01", "--centralised", "--seed", "3", "--amp"]) == \
        ["--lr", "0.01", "--rounds", "5", "--amp", "--centralised", "--seed", "3"]
    assert argv == ["--lr", "0.06", "--rounds", "5", "--amp"]                      # not changed in place


def test_plots_are_redrawn_from_curves_csv_alone_with_the_same_numbers(tmp_path):
    def rec(r, acc, cos):
        return {"round": r, "acc": {"mean": acc}, "cos": cos, "cos_fedit": cos, "ceiling": cos + 0.01,
                "rel_err": 0.1, "train_loss": 1.0, "scale": 0.9}
    results = {"fedit": [[rec(1, 0.5, 0.9), rec(2, 0.6, 0.95)], [rec(1, 0.7, 0.8), rec(2, 0.8, 0.85)]],
               "centralised": [[rec(1, 0.9, 1.0), rec(2, 0.95, 1.0)], [rec(1, 0.9, 1.0), rec(2, 0.9, 1.0)]]}
    cell = tmp_path / "shapes-x"
    cell.mkdir()
    compare.write_curves(results, [0, 1], str(cell))
    again = compare.series_from_csv(str(cell / "curves.csv"))
    assert again == compare.series(results)
    assert again["fedit"]["acc"] == pytest.approx([60.0, 70.0]) and again["fedit"]["round"] == [1, 2]
    assert compare.replot(str(tmp_path)) == [str(cell / "curves.csv")]
    assert (cell / "curves.png").stat().st_size > 0 and (cell / "bias.png").stat().st_size > 0


def test_every_row_gets_its_difference_to_lorafair_refilled_from_curves_csv(tmp_path):
    def rec(acc):
        return {"round": 1, "acc": {"mean": acc}, "cos": 0.9, "rel_err": 0.1, "train_loss": 1.0}
    results = {"fedit": [[rec(0.70)], [rec(0.72)], [rec(0.71)]], "lorafair": [[rec(0.71)], [rec(0.74)], [rec(0.71)]]}
    compare.write_curves(results, [0, 1, 2], str(tmp_path))
    table = tmp_path / "table.md"
    table.write_text("head\n\n| method | **mean** | Δ vs fedit | Δ vs lorafair | cos |\n|---|---|---|---|---|\n"
                     "| fedit | **71** |  |  | 0.9 |\n| lorafair | **72** | +1 |  | 0.9 |\n")
    compare.refill_fair_column(str(table), str(tmp_path / "curves.csv"))
    rows = table.read_text().splitlines()
    assert rows[4] == f"| fedit | **71** |  | {compare.paired([0.70, 0.72, 0.71], [0.71, 0.74, 0.71])} | 0.9 |"
    assert rows[4].split(" | ")[3].startswith("-1.00 [") and rows[5] == "| lorafair | **72** | +1 |  | 0.9 |"
