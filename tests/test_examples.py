"""The examples stay runnable."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs(capsys):
    main = runpy.run_path(str(EXAMPLES / "quickstart.py"))["main"]
    report = main(n_train=60, n_test=30)
    out = capsys.readouterr().out
    assert "DiT features: (8, 256)" in out and "reloaded predictions identical: True" in out
    assert 0 <= report["mAP"] <= 1
