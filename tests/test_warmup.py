"""``kdnumba warmup`` fills the compilation cache that later processes load from."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kdnumba import cli, warmup

ROOT = Path(__file__).resolve().parents[1]

_FIRST_CALL = """
    import json
    import numpy as np
    from kdnumba.functional import feature_loss
    from kdnumba.benchmarking.runner import kernel_cache_stats
    for dtype in (np.float32, np.float64):
        s = np.ones((4, 3), dtype)
        feature_loss(s, s * 2)
    print(json.dumps(kernel_cache_stats()))
"""


def test_warmup_compiles_into_the_cache_later_processes_load(tmp_path):
    env = {**os.environ, "KDNUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "kdnumba.cli", "warmup", "--only",
                           "feature_loss", "--jobs", "2", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "2/2 loss x dtype jobs compiled" in proc.stderr
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent(_FIRST_CALL)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr
    hits, misses = json.loads(probe.stdout.strip().splitlines()[-1])
    assert misses == 0 and hits > 0


def test_jobs_cover_every_registered_loss_in_both_dtypes():
    from kdnumba import functional

    work = warmup.jobs()
    assert {name for name, _ in work} == {spec.name for spec in functional.specs()}
    assert {dtype for _, dtype in work} == {"float32", "float64"}
    assert warmup.jobs(["kd_loss"]) == [("kd_loss", "float32"), ("kd_loss", "float64")]


def test_a_failing_job_is_reported_not_raised(monkeypatch):
    from kdnumba import registry

    def broken(**kwargs):
        raise RuntimeError("boom")

    spec = dataclasses.replace(registry.get("feature_loss"), function=broken)
    monkeypatch.setattr(registry, "get", lambda name: spec)
    result = warmup.compile_one("feature_loss", "float64")
    assert result.error == "RuntimeError: boom"


@pytest.mark.parametrize("argv, message", [
    (["warmup", "--only", "no_such_loss"], "unknown loss name"),
    (["warmup", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_arguments_fail_before_any_work(capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
