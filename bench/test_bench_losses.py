"""pytest-benchmark: every registered loss, kdnumba vs NumPy vs PyTorch CPU.

Run with ``python -m pytest bench --benchmark-enable`` (add ``-k kd_loss``
or ``-k B4096_C1000`` to narrow it). The cases are the registry's workloads
(``kdnumba.registry.Workload`` in each loss's declaration) plus a family's
extra ``kdnumba/benchmarking/cases_<family>.py``, the same ones
``kdnumba bench`` times.
"""

from kdnumba.benchmarking.pytest_bench import make_tests

globals().update(make_tests())
