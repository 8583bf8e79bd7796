"""Benchmarks (pytest-benchmark). Not collected by the default test run.

    python -m pytest bench --benchmark-enable

``test_bench_losses.py`` is generated from the registry's workloads by
:func:`kdnumba.benchmarking.pytest_bench.make_tests`.
"""


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the thread counts and versions the figures depend on."""
    from kdnumba.benchmarking.machine import machine_info as kd_machine

    machine_info["kdnumba"] = kd_machine()
