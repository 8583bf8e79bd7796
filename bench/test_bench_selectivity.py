"""pytest-benchmark: neuron-selectivity distillation (``selectivity_loss``),
kdnumba vs NumPy vs PyTorch CPU, for the three metrics.

Run with ``python -m pytest bench/test_bench_selectivity.py --benchmark-enable``
(add ``-k variance`` for the headline metric). The cases -- shapes, dtypes,
the PyTorch equivalent -- live in ``kdnumba/benchmarking/cases_selectivity.py``
and are the ones ``kdnumba bench`` times.
"""

from kdnumba.benchmarking.pytest_bench import make_tests

globals().update(make_tests("selectivity"))
