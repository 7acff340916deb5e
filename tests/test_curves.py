"""bench.tools.curves: learning curves from a run's trial logs and evaluations (hand-made run, no Ray)."""

from __future__ import annotations

import json

import pandas as pd

from bench.results import trial_dir
from bench.tools import curves
from tests.report_data import make_run


def test_curves_draw_loss_gold_and_kl_per_knob_value_and_refuse_what_is_not_there(tmp_path, capsys):
    out = make_run(tmp_path / "run")
    trials = pd.read_parquet(out / "trials.parquet")
    for t in trials[trials["algorithm"] == "dpo"].itertuples():
        d = trial_dir(out, t.trial_id)
        d.mkdir(parents=True)
        (d / "train_log.jsonl").write_text("".join(
            json.dumps({"step": s, "losses/dpo": 0.69 - 0.01 * s, "optim/lr": 1e-4}) + "\n" for s in range(1, 21)))
    logs = curves.train_logs(out, trials)
    ok_dpo = trials[(trials["algorithm"] == "dpo") & (trials["status"] == "ok")]
    assert len(logs) == 20 * len(ok_dpo)  # the failed trial's log is left out (it has none here either)
    fig = curves.figure(out, ["dpo", "best-of-n"])
    assert len(fig.axes) == 6
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [20, 20]  # one loss curve per beta
    assert fig.axes[0].get_title() == "dpo: losses/dpo" and fig.axes[3].get_title() == "best-of-n: no loss logged"
    png = tmp_path / "curves.png"
    assert curves.main([str(out), "dpo", "--out", str(png)]) == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert curves.main([str(out), "simpo", "--out", str(png)]) == 2
    assert curves.main([str(tmp_path / "nope"), "dpo", "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert "not in this run: simpo" in err and "has no evals.parquet" in err
