"""pytest-benchmark: attention transfer and attention-map KL, kdnumba vs NumPy vs PyTorch CPU.

Run with ``python -m pytest bench/test_bench_attention.py --benchmark-enable``. The
cases live in ``kdnumba/benchmarking/cases_attention.py`` and are the ones
``kdnumba bench`` times.
"""

from kdnumba.benchmarking.pytest_bench import make_tests

globals().update(make_tests("attention"))
