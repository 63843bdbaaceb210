"""The training-time ledger: two clocks, carried across sessions, never below what was recorded."""

from __future__ import annotations

import json

import pytest

from lvlm_hallu.lvlm.shapes.budget import Ledger, Spent


def test_an_old_record_counts_its_wall_time_as_cpu_time():
    assert Spent.from_record({"train_s": 538.0, "step": 50}) == Spent(538.0, 538.0)
    assert Spent.from_record({"train_s": 10.0, "cpu_s": 4.0}).on("cpu") == 4.0
    with pytest.raises(KeyError, match="wall, cpu"):
        Spent().on("gpu")


def test_a_resumed_session_starts_from_the_larger_of_ledger_and_checkpoint(tmp_path):
    (tmp_path / "spent.json").write_text(json.dumps({"train_s": 100.0, "cpu_s": 30.0, "step": 7}))
    ledger = Ledger.resume(tmp_path, Spent(90.0, 45.0))  # the checkpoint is older on the wall clock
    assert ledger.prior == Spent(100.0, 45.0)
    sum(i * i for i in range(200_000))  # some CPU time
    spent = ledger.write(8)
    assert spent.train_s > 100.0 and spent.cpu_s > 45.0
    assert json.loads((tmp_path / "spent.json").read_text())["step"] == 8
    assert Ledger.resume(tmp_path, None).prior == Spent()  # a fresh run ignores an old ledger
