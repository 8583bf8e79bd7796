"""pytest-benchmark: response-based KD (``kd_loss``), kdnumba vs NumPy vs PyTorch CPU.

Run with ``python -m pytest bench --benchmark-enable`` (add
``-k B4096_C1000`` for the headline case). The cases -- shapes, dtypes,
the PyTorch equivalent -- live in ``kdnumba/benchmarking/cases_response.py``
and are the ones ``kdnumba bench`` times.
"""

from kdnumba.benchmarking.pytest_bench import make_tests

globals().update(make_tests("response"))
