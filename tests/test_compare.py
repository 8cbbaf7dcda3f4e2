"""bench/compare.py reuses a run only when its recorded settings equal the requested ones."""
import pytest

import train
from bench import compare
from tests.test_train import TINY


def test_a_run_is_reused_only_with_the_same_settings(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "fedit" / "seed0")
    argv = [*TINY, "--method", "fedit", "--rounds", "1", "--seed", "0"]
    first = compare.run_variant("fedit", argv, out)
    assert [r["round"] for r in first] == [1]
    calls = []
    real = train.main
    monkeypatch.setattr(train, "main", lambda a: calls.append(a) or real(a))
    assert compare.run_variant("fedit", [*argv, "--workers", "0"], out) == first   # device settings: reused
    assert calls == [] and "reusing" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(lr: 0.05 there, 0.1 asked\)"):
        compare.run_variant("fedit", [*argv, "--lr", "0.1"], out)
    with pytest.raises(SystemExit, match="holds a run of 1 rounds, 0 asked"):
        compare.run_variant("fedit", [*TINY, "--method", "fedit", "--rounds", "0", "--seed", "0"], out)
    more = compare.run_variant("fedit", [*TINY, "--method", "fedit", "--rounds", "2", "--seed", "0"], out)
    assert len(calls) == 1 and "--resume" in calls[0] and [r["round"] for r in more] == [1, 2]
    assert more[0] == first[0]
