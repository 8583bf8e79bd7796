"""``kdnumba demo --scale``: a teacher cache built through Dask, students trained from it.

Runs on a user ``.npz`` (no scikit-learn needed) with ``--quick``, through the
real CLI, on a two-worker LocalCluster the demo starts itself (~10 s here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("distributed", reason="--scale needs dask.distributed (pip install "
                                          "'kdnumba[scale]')")
pytest.importorskip("zarr", reason="--scale needs zarr (pip install 'kdnumba[scale]')")

from kdnumba import cli  # noqa: E402


def _blobs(path, n=300, d=6, k=6):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((k, d)) * 2.5
    y = rng.integers(0, k, n)
    np.savez(path, X=centers[y] + rng.standard_normal((n, d)), y=y)
    return path


def test_scale_demo_builds_through_dask_and_trains_from_the_store(tmp_path, capsys):
    data = _blobs(tmp_path / "blobs.npz")
    out = tmp_path / "out"
    code = cli.main(["demo", "--scale", "--quick", "--data", str(data), "--out", str(out),
                     "--train-size", "30"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "LocalCluster of 2 worker processes" in text
    report = json.loads((out / "scale" / "scale-results.json").read_text())
    assert set(report["stores"]) == {"topk", "dense"}
    assert report["stores"]["topk"]["bytes"] < report["stores"]["dense"]["bytes"]
    names = list(report["results"])
    assert names[0] == "student alone" and "sparse_kd_loss" in names[1]
    for r in report["results"].values():
        assert 0.0 <= r["accuracy"] <= 1.0
    # well-separated blobs: students distilled without labels learn them
    assert report["results"][names[1]]["accuracy"] > 0.8


def test_scale_demo_rejects_bad_workers(tmp_path, capsys):
    code = cli.main(["demo", "--scale", "--workers", "0", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
