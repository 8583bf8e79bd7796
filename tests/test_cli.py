"""The ``kdnumba`` command line: ``bench`` end to end, option errors, ``demo`` routing."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from kdnumba import cli
from kdnumba.benchmarking import FAMILIES, BenchCase, all_cases, report
from kdnumba.benchmarking.runner import select_cases
from kdnumba.benchmarking.timing import TimingPolicy, time_interleaved

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except Exception:
    HAVE_TORCH = False


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# --- kdnumba bench --quick --json --family response (one real run) ------------

@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    saved = tmp_path_factory.mktemp("bench") / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kdnumba.cli", "bench", "--quick", "--json",
         "--family", "response", "--save", str(saved)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), saved  # stdout holds the JSON and nothing else


@pytest.fixture(scope="module")
def bench_json(bench_run):
    return bench_run[0]


def test_bench_save_writes_the_same_document(bench_run):
    doc, saved = bench_run
    assert json.loads(saved.read_text()) == doc


def test_bench_load_renders_without_measuring(bench_run, capsys):
    doc, saved = bench_run
    assert cli.main(["bench", "--load", str(saved), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert all(f"`{c['name']}`" in out for c in doc["cases"])
    assert doc["machine"]["date"] in out  # the saved run's date, not today's


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("not json", "cannot read"),
    ('{"schema": "other"}', "is not a 'kdnumba bench --save' file"),
    ('{"schema": "kdnumba.bench/1", "cases": [1, 2', "cannot read"),  # truncated
    ('{"schema": "kdnumba.bench/1"}', "damaged or incomplete"),
    ('{"schema": "kdnumba.bench/1", "machine": {}, "cases": 5}', "damaged or incomplete"),
    ('{"schema": "kdnumba.bench/1", "machine": {"cpu": 1}, "settings": {}, "bounds": {},'
     ' "cases": [{"name": "x"}]}', "damaged or incomplete"),
])
def test_bench_load_errors(tmp_path, capsys, content, message):
    path = tmp_path / "saved.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["bench", "--load", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_bench_json_top_level(bench_json):
    doc = bench_json
    assert doc["schema"] == "kdnumba.bench/1"
    assert set(doc) >= {"machine", "settings", "bounds", "cases", "elapsed_s", "load_errors"}
    assert doc["load_errors"] == {}
    m = doc["machine"]
    for key in ("cpu", "cores", "numba_threads", "threading_layer", "python", "numpy",
                "numba", "torch", "kdnumba", "date"):
        assert key in m, key
    assert m["numba_threads"] >= 1 and m["cores"] >= 1
    assert (m["torch"] is not None) == HAVE_TORCH
    assert doc["settings"]["quick"] is True
    assert doc["settings"]["compile_method"] == "first call in this process"
    assert doc["settings"]["families"] == ["response"]
    assert _positive(doc["bounds"]["dram"]["gbps"])
    assert doc["bounds"]["dram"]["bytes"] >= 2**30


def test_bench_json_cases(bench_json):
    cases = bench_json["cases"]
    expected = [c.name for c in all_cases(("response",)) if c.quick]
    assert [c["name"] for c in cases] == expected and expected
    for c in cases:
        assert c["family"] == "response"
        kd = c["kdnumba"]
        assert _positive(kd["min_s"]) and kd["min_s"] <= kd["median_s"]
        assert kd["repeats"] >= 1 and _positive(kd["first_call_s"])
        assert set(c["variants"]) == {"out="}
        assert _positive(c["numpy"]["min_s"])
        assert _positive(c["ratios"]["numpy/kdnumba"]["min"])
        if HAVE_TORCH:
            assert _positive(c["torch"]["min_s"])
            assert _positive(c["ratios"]["torch/kdnumba"]["min"])
        else:
            assert c["torch"] is None
        mem = c["memory_bound"]
        assert mem["bytes_moved"] == c["bytes_moved"] > 0
        for key in ("cache_hot_s", "dram_s", "kdnumba/cache_hot", "kdnumba/dram"):
            assert _positive(mem[key]), key
        assert c["gemm_bound"] is None  # kd_loss declares no flops
        # --quick: the first call in the run's own process, a compilation on a
        # fresh machine or a load from the disk cache -- exactly one of the two.
        comp = c["compile"]
        assert comp["method"] == "first call in this process"
        assert [_positive(comp["cold_s"]), _positive(comp["cached_s"])].count(True) == 1, comp
        assert set(c["first_call"]) == {"s", "compiled", "from_cache"}
        # Same inputs, same answer: kdnumba, its variant, NumPy and PyTorch agree.
        assert not c["disagrees"], c["agreement"]
        assert {"out=", "numpy"} <= set(c["agreement"])
        assert c["errors"] == {}


def test_reports_render_the_run(bench_json):
    text = report.format_text(bench_json)
    md = report.format_markdown(bench_json)
    for case in bench_json["cases"]:
        assert case["name"] in text and f"`{case['name']}`" in md
    assert "numba" in text and "DRAM" in md
    header = next(line for line in md.splitlines() if line.startswith("| case"))
    rule = md.splitlines()[md.splitlines().index(header) + 1]
    assert header.count("|") == rule.count("|")


# --- option errors -----------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["bench", "--family", "nope"], "invalid choice"),
    (["bench", "--json", "--markdown"], "not allowed with"),
    (["bench", "--threads", "0"], "positive integer"),
    (["bench", "--threads", "many"], "positive integer"),
    (["bench", "--threads", "100000"], "at most"),
    (["bench", "--min-time", "-1"], "positive number"),
    (["bench", "--bogus"], "unrecognized arguments"),
    (["bench", "--case", "no-such-case-name"], "no benchmark cases match"),
    (["bench", "--save", "/no/such/folder/x.json"], "folder does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_unknown_family_error_lists_the_valid_ones(capsys):
    assert cli.main(["bench", "--family", "nope"]) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in FAMILIES)


def test_family_that_fails_to_import_is_reported(monkeypatch, capsys):
    from kdnumba.benchmarking import runner

    def broken(families):
        raise ImportError(f"cannot import the {families[0]} kernels")

    monkeypatch.setattr(runner, "all_cases", broken)
    assert cli.main(["bench", "--family", "selectivity", "--no-compile"]) == 2
    err = capsys.readouterr().err
    assert "'selectivity' cases could not be loaded" in err
    assert "cannot import the selectivity kernels" in err


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().err


def test_help_and_version_exit_0(capsys):
    assert cli.main(["--version"]) == 0
    assert "kdnumba" in capsys.readouterr().out
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--json" in out and "--markdown" in out


# --- demo routing ------------------------------------------------------------

def test_demo_missing_module_exits_2_with_a_message(monkeypatch, capsys):
    # Exercise the "not installed" path whether or not kdnumba/demo.py exists.
    monkeypatch.setattr(cli, "_DEMO_MODULE", "kdnumba._no_such_demo_module")
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "kdnumba demo" in err and "missing" in err


@pytest.mark.skipif(importlib.util.find_spec("kdnumba.demo") is None,
                    reason="kdnumba.demo is not part of this tree yet")
def test_demo_help_comes_from_the_demo_module(capsys):
    assert cli.main(["demo", "--help"]) == 0
    assert "usage: kdnumba demo" in capsys.readouterr().out


def test_bench_does_not_import_the_demo():
    code = ("import sys; from kdnumba import cli; cli.build_parser(); "
            "sys.exit('kdnumba.demo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# --- building blocks ----------------------------------------------------------

def test_select_cases_filters():
    quick = select_cases(["response"], quick=True)
    assert quick and all(c.quick and c.family == "response" for c in quick)
    named = select_cases(["response"], ["B64_C32000"])
    assert [c.name for c in named] == ["kd_loss/B64_C32000/float32"]
    assert select_cases(["response"], ["no-such-case"]) == []


def test_benchmark_cases_come_from_the_registry_and_are_well_formed():
    from kdnumba import functional

    cases = all_cases()
    assert len({c.name for c in cases}) == len(cases)
    for spec in functional.specs():
        mine = [c for c in cases if c.name.startswith(spec.name + "/")]
        assert len(mine) >= len(spec.workloads), spec.name
    response = all_cases(("response",))
    assert len(response) == sum(len(s.workloads) for s in functional.specs()
                                if s.family == "response")
    for c in response:
        assert isinstance(c, BenchCase) and c.family == "response"
        assert c.numpy is not None and c.torch is not None
    small = next(c for c in response if "B256_C10" in c.name)
    inputs = small.make_inputs(np.random.default_rng(0))
    # student and teacher read, gradient written, int64 labels read
    assert small.bytes_for(inputs) == 3 * 256 * 10 * 4 + 8 * 256


def test_time_interleaved_reports_each_implementation():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    policy = TimingPolicy(min_repeats=4, min_time_s=0.0, max_time_s=1.0, sample_s=1e-4,
                          rounds=2)
    out = time_interleaved({"a": a, "b": b}, policy)
    assert set(out) == {"a", "b"}
    for label, t in out.items():
        assert t.repeats >= 4 and t.number >= 1
        assert 0 < t.min_s <= t.median_s
        # first call + calibration + one untimed call per round + the samples
        assert calls[label] == 2 + policy.rounds + t.repeats * t.number


@pytest.fixture
def no_demo_work(monkeypatch):
    """The demo's argument checks only: doing any work fails the test."""
    pytest.importorskip("kdnumba.demo")
    from kdnumba import demo

    def work(*args, **kwargs):
        raise AssertionError("the demo started working before rejecting its arguments")

    monkeypatch.setattr(demo, "run_demo", work)


@pytest.mark.parametrize("make_out", [
    lambda tmp: tmp / "a-file" / "out",           # under a file
    lambda tmp: tmp / "a-file",                   # a file, not a folder
    lambda tmp: "/proc/kdnumba-no-such-dir/out",  # a place nothing can be created
])
@pytest.mark.parametrize("extra", [[], ["--no-cache"]])
def test_demo_unusable_out_fails_before_any_work(tmp_path, capsys, no_demo_work, make_out,
                                                 extra):
    (tmp_path / "a-file").write_text("")
    out = str(make_out(tmp_path))
    assert cli.main(["demo", "--quick", "--out", out, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdnumba demo: error: --out") and err.count("\n") == 1, err
    assert out in err


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1"])
def test_demo_rejects_a_non_finite_or_non_positive_temperature(capsys, no_demo_work, value):
    assert cli.main(["demo", "--quick", f"--temperature={value}"]) == 2
    err = capsys.readouterr().err
    assert "--temperature must be a finite number > 0" in err and err.count("\n") == 1, err


def test_demo_bad_out_in_a_real_process_is_one_line_on_stderr(tmp_path):
    pytest.importorskip("kdnumba.demo")
    (tmp_path / "f").write_text("")
    proc = subprocess.run([sys.executable, "-m", "kdnumba.cli", "demo", "--no-cache",
                           "--out", str(tmp_path / "f" / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_an_os_error_while_running_is_one_line(monkeypatch, capsys):
    from kdnumba.benchmarking import runner

    def disk_full(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "run_from_args", disk_full)
    assert cli.main(["bench", "--quick"]) == 1
    assert capsys.readouterr().err == "kdnumba bench: error: [Errno 28] No space left on device\n"


# --- kdnumba bench --compile-only ------------------------------------------------------

def test_first_call_cases_cover_every_loss_in_both_dtypes():
    from kdnumba import functional
    from kdnumba.benchmarking.registry_cases import first_call_cases

    names = [c.name for c in first_call_cases()]
    expected = [f"first-call/{spec.name}/{dtype}" for spec in functional.specs()
                if spec.workloads for dtype in ("float32", "float64")]
    assert names == expected
    inputs = first_call_cases(("feature",), ("float64",))[0].make_inputs(np.random.default_rng(0))
    assert all(a.dtype == np.float64 for a in inputs["args"].values()
               if isinstance(a, np.ndarray) and a.dtype.kind == "f")


def test_compile_only_measures_each_loss_and_all_together(monkeypatch, capsys):
    from kdnumba.benchmarking import compile_table

    calls = []

    def fake_measure(names, *, family=None, threads=None, **_):
        calls.append((names, family))
        if isinstance(names, str):
            return {"cold_s": 2.0, "cached_s": 0.25}
        return {"cold_s": 3.0, "cached_s": 0.5}

    monkeypatch.setattr(compile_table, "measure_compile", fake_measure)
    assert cli.main(["bench", "--compile-only", "--family", "relational", "--family",
                     "feature", "--markdown", "-q"]) == 0
    out = capsys.readouterr().out
    assert "| `rkd_loss` | float32 | 2.00 s | 0.25 s |" in out
    assert "| `feature_loss` | float64 | 2.00 s | 0.25 s |" in out
    assert "| sum of the 2 rows | float32 | 4.00 s | 0.50 s |" in out
    assert "| all in one process | float64 | 3.00 s | 0.50 s |" in out
    together = [names for names, _ in calls if not isinstance(names, str)]
    assert together == [["first-call/feature_loss/float32", "first-call/rkd_loss/float32"],
                        ["first-call/feature_loss/float64", "first-call/rkd_loss/float64"]]


def test_compile_only_reports_a_failing_loss_and_exits_1(monkeypatch, capsys):
    from kdnumba.benchmarking import compile_table

    def broken(names, **_):
        raise RuntimeError("compile probe failed (exit 1): boom")

    monkeypatch.setattr(compile_table, "measure_compile", broken)
    assert cli.main(["bench", "--compile-only", "--family", "feature", "-q"]) == 1
    out = capsys.readouterr().out
    assert "RuntimeError: compile probe failed (exit 1): boom" in out


def test_compile_probe_sums_several_cases_in_one_process(tmp_path):
    from kdnumba.benchmarking.compile_probe import measure_compile

    # The same small case twice: the second call in the process finds the
    # kernel compiled, and the probe still adds both first calls up.
    name = "kd_loss/B256_C10/float32"
    result = measure_compile([name, name], timeout_s=300)
    assert result["cold_s"] > result["cached_s"] > 0
