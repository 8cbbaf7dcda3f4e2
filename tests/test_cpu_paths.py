"""bench/cpu_paths.py: the code paths it asks for are the ones torch runs; its table's arithmetic."""
import os

import pytest

from bench import cpu_paths


def test_each_code_path_is_the_one_torch_reports():
    assert cpu_paths.capability({**os.environ, **cpu_paths.PATHS["default-sse4_2"]}) == "DEFAULT"
    home = cpu_paths.capability(dict(os.environ))
    if home == "DEFAULT":
        pytest.skip("this CPU has no vector path to move away from")
    asked = cpu_paths.capability({**os.environ, **cpu_paths.PATHS["avx2"]})
    assert asked in ("AVX2", "DEFAULT")                     # AVX2, or nothing better where the CPU lacks it


def test_the_table_puts_the_spread_over_paths_next_to_the_spread_over_seeds():
    rows = {"home": {"a": [0.70, 0.72, 0.74], "b": [0.71, 0.74, 0.74]},
            "other": {"a": [0.70, 0.70, 0.76], "b": [0.71, 0.74, 0.73]}}
    lines = cpu_paths.table(rows, [0, 1, 2], "cell")
    home = next(line for line in lines if line.startswith("| home"))
    assert "+1.0, +2.0, +0.0" in home                                    # b - a per seed, points
    other = next(line for line in lines if line.startswith("| other"))
    assert "+1.0, +4.0, -3.0" in other
    a = next(line for line in lines if line.startswith("| a |"))
    # a's range over paths per seed: 0, 2, 2 -> mean 1.33, max 2; std over seeds: 2.00 and 3.46 -> 2.73
    assert a == "| a | 1.33 (2.00) | 2.73 |"
    diff = next(line for line in lines if line.startswith("| b − a |"))
    # b - a: home 1, 2, 0; other 1, 4, -3 -> ranges 0, 2, 3 (mean 1.67, max 3); std 1.00 and 3.51 -> 2.26
    assert diff == "| b − a | 1.67 (3.00) | 2.26 |"


def test_unknown_paths_and_missing_runs_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="no code path avx9"):
        cpu_paths.main(["--paths", "avx9", "--home", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"fedit: no runs for seeds \[0, 1\]"):
        cpu_paths.final_means(str(tmp_path), "shapes-paper-vit", ["fedit"], [0, 1])


def test_a_cell_without_run_folders_is_read_from_its_curves_csv(tmp_path):
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "curves.csv").write_text(
        "variant,seed,round,mean_acc,cos\nfedit,0,1,0.5,0.9\nfedit,0,2,0.6,0.9\nfedit,1,1,0.7,0.9\nfedit,1,2,0.8,0.9\n"
        "lorafair,0,2,0.65,0.9\n")
    assert cpu_paths.final_means(str(tmp_path), "cell", ["fedit"], [0, 1]) == {"fedit": [0.6, 0.8]}   # last rounds
    with pytest.raises(SystemExit, match=r"lorafair: no runs for seeds \[1\]"):
        cpu_paths.final_means(str(tmp_path), "cell", ["lorafair"], [0, 1])
