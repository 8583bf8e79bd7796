"""pytest-benchmark: contrastive distillation (``nt_xent``, ``info_nce``,
``supervised_contrastive``, ``triplet_loss``), kdnumba vs NumPy vs PyTorch CPU.

Run with ``python -m pytest bench/test_bench_contrastive.py --benchmark-enable``
(add ``-k B4096_D128/float32`` for the headline sizes). The cases -- shapes,
dtypes, the PyTorch equivalents -- live in
``kdnumba/benchmarking/cases_contrastive.py`` and are the ones ``kdnumba bench``
times. Time and peak memory against ``B`` (1k..65k), one fresh process per point::

    python -m kdnumba.benchmarking.cases_contrastive --plot docs/img/contrastive_scaling.png
"""

from kdnumba.benchmarking.pytest_bench import make_tests

globals().update(make_tests("contrastive"))
