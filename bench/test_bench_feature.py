"""pytest-benchmark: FitNets feature loss, kdnumba vs NumPy vs PyTorch CPU.

Run with ``python -m pytest bench/test_bench_feature.py --benchmark-enable``. The
cases live in ``kdnumba/benchmarking/cases_feature.py`` and are the ones
``kdnumba bench`` times.
"""

from kdnumba.benchmarking.pytest_bench import make_tests

globals().update(make_tests("feature"))
