"""``kdnumba demo``: end to end on a reduced setting, its options and its errors."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest

from kdnumba import demo

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_sklearn = pytest.mark.skipif(
    not HAS_SKLEARN, reason="the digits demo needs scikit-learn (pip install 'kdnumba[demo]')")


def _blobs_npz(path, *, n=160, d=5, k=3, names=("X", "y"), seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 2.5
    y = rng.integers(0, k, n)
    x = centers[y] + rng.standard_normal((n, d))
    np.savez(path, **{names[0]: x, names[1]: y})
    return path


def _cli(argv):
    """The demo through the real ``kdnumba`` CLI when it is present, else through
    the demo's own parser (same add_arguments/run)."""
    try:
        from kdnumba import cli
    except ImportError:
        return demo.main(argv)
    return cli.main(["demo", *argv])


@needs_sklearn
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = demo.main(["--quick", "--seeds", "2", "--epochs", "3", "--out", str(out)])
    captured = capsys.readouterr()
    report = json.loads((out / "results.json").read_text())
    assert code in (0, 1), captured.err
    for name, r in report["strategies"].items():
        assert r["status"] in ("ok", "unavailable"), (name, r.get("reason"))
    assert code == 0
    assert list(report["strategies"]) == list(demo.ALL_STRATEGIES)
    for name in ("student", "kd"):
        r = report["strategies"][name]
        assert r["status"] == "ok" and len(r["accuracies"]) == 2
        assert len(r["curve_mean"]) == 3
        assert 0.0 <= r["kdnumba_share"] <= 1.0 and r["kdnumba_seconds"] > 0
    assert report["seeds"] == [0, 1] and report["config"]["epochs"] == 3
    assert report["teacher"]["test_accuracy"] > 0.5
    assert "accuracy mean +- std" in captured.out and "response KD" in captured.out
    assert f"results: {out / 'results.json'}" in captured.out
    if HAS_MPL:
        png = out / "demo.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot:    {png}" in captured.out
    # second run: the teacher comes from the cache folder
    assert not report["teacher"]["loaded_from_cache"]
    demo.main(["--quick", "--seeds", "1", "--epochs", "2", "--strategy", "kd",
               "--out", str(out), "--no-plot"])
    report2 = json.loads((out / "results.json").read_text())
    assert report2["teacher"]["loaded_from_cache"]
    assert report2["teacher"]["test_accuracy"] == report["teacher"]["test_accuracy"]
    assert list(report2["strategies"]) == ["student", "kd"]


def test_user_npz_dataset_works_without_scikit_learn(tmp_path, capsys):
    data = _blobs_npz(tmp_path / "blobs.npz")
    code = _cli(["--data", str(data), "--quick", "--seeds", "2", "--epochs", "4",
                 "--strategy", "kd", "--out", str(tmp_path / "o"), "--no-plot"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    assert report["data"].startswith("blobs.npz (160 x 5, 3 classes)")
    assert report["n_pool"] + report["n_test"] == 160
    assert report["strategies"]["kd"]["mean"] > 0.5
    assert not (tmp_path / "o" / "demo.png").exists()


@pytest.mark.parametrize("argv_extra, message", [
    (["--data", "{tmp}/missing.npz"], "--data file not found: {tmp}/missing.npz"),
    (["--data", "{tmp}/wrong.npz"], "must contain arrays named 'X'"),
    (["--data", "{tmp}/notnpz.npz"], "could not read"),
    (["--data", "{tmp}/floaty.npz"], "must hold class labels"),
    (["--strategy", "kd,bogus"], "unknown strategy 'bogus'"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
])
def test_cli_errors_exit_non_zero_with_a_message(tmp_path, capsys, argv_extra, message):
    _blobs_npz(tmp_path / "wrong.npz", names=("features", "labels"))
    (tmp_path / "notnpz.npz").write_bytes(b"hello")
    np.savez(tmp_path / "floaty.npz", X=np.zeros((40, 2)), y=np.linspace(0, 1, 40))
    argv = [a.format(tmp=tmp_path) for a in argv_extra]
    if "--data" not in argv:
        argv += ["--data", str(_blobs_npz(tmp_path / "ok.npz"))]
    code = _cli(argv + ["--quick", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "kdnumba demo: error:" in err and message.format(tmp=tmp_path) in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_wrong_array_names_lists_what_was_found(tmp_path, capsys):
    path = _blobs_npz(tmp_path / "wrong.npz", names=("X", "labels"))
    assert demo.main(["--data", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing 'y'" in err and "found 'X', 'labels'" in err


def test_parse_strategies_and_config():
    assert demo.parse_strategies(None) == ["student", *demo.DEFAULT_STRATEGIES]
    assert (demo.parse_strategies(["response", "kd,hybrid", "Student"])
            == ["student", "kd", "hybrid"])
    assert demo.parse_strategies(["all"]) == ["student", *demo.DEFAULT_STRATEGIES]
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--quick", "--epochs", "7", "--train-size", "0"])
    cfg = demo.config_from_args(args)
    assert cfg.epochs == 7 and cfg.seeds == demo.QUICK["seeds"] and cfg.train_size is None
    full = demo.config_from_args(parser.parse_args([]))
    assert full.seeds >= 5


def test_unavailable_strategy_is_listed_not_fatal(tmp_path, monkeypatch, capsys):
    real = demo.build_strategy

    def fake(name, cfg, labels=None):
        if name == "kd":
            raise demo.Unavailable("DistillationLoss is not available in this build of kdnumba")
        return real(name, cfg, labels)

    monkeypatch.setattr(demo, "build_strategy", fake)
    data = _blobs_npz(tmp_path / "b.npz")
    code = demo.main(["--data", str(data), "--quick", "--seeds", "1", "--epochs", "2",
                      "--strategy", "kd", "--out", str(tmp_path / "o"), "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0
    assert "response KD     unavailable: DistillationLoss is not available" in out
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    assert report["strategies"]["kd"]["status"] == "unavailable"
    assert report["strategies"]["student"]["status"] == "ok"


def test_a_failing_strategy_is_reported_and_exits_1(tmp_path, monkeypatch, capsys):
    real = demo.build_strategy

    class Broken:
        def loss_and_gradient(self, s, t, labels=None):
            raise RuntimeError("boom")

    monkeypatch.setattr(demo, "build_strategy",
                        lambda name, cfg, labels=None: Broken() if name == "kd"
                        else real(name, cfg, labels))
    data = _blobs_npz(tmp_path / "b.npz")
    code = demo.main(["--data", str(data), "--quick", "--seeds", "1", "--epochs", "2",
                      "--strategy", "kd", "--out", str(tmp_path / "o"), "--no-plot"])
    captured = capsys.readouterr()
    assert code == 1
    assert "response KD    FAILED: RuntimeError: boom" in captured.out
    assert "failed: response KD" in captured.err
