"""pytest-benchmark: relational KD (``rkd_loss``), kdnumba vs NumPy vs PyTorch CPU.

Run with ``python -m pytest bench/test_bench_relational.py --benchmark-enable``. The
cases live in ``kdnumba/benchmarking/cases_relational.py`` and are the ones
``kdnumba bench`` times.
"""

from kdnumba.benchmarking.pytest_bench import make_tests

globals().update(make_tests("relational"))
