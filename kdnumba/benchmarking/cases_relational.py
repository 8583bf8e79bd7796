"""The one relational benchmark case the registry cannot declare (the others
are ``rkd_loss``'s workloads in ``kdnumba/functional/relational.py``).

At ``B = 2048`` RepDistiller's formula (the NumPy reference and PyTorch)
needs 32 GiB per ``B^3`` float32 tensor, so this case has kdnumba only; it
shows kdnumba's bounded memory (about ``5 B^2`` float64 values, 160 MiB).
A :class:`kdnumba.registry.Workload` always times the reference as well.
"""

from __future__ import annotations

import numpy as np

from kdnumba.benchmarking import BenchCase
from kdnumba.functional import rkd_loss


def _make_inputs(rng) -> dict:
    student = rng.standard_normal((2048, 128)).astype(np.float32)
    teacher = (student + 0.5 * rng.standard_normal(student.shape)).astype(np.float32)
    return {"student_emb": student, "teacher_emb": teacher}


CASES = [
    BenchCase(
        name="rkd_loss/B2048_D128/float32",
        family="relational",
        make_inputs=_make_inputs,
        kdnumba=lambda d: rkd_loss(**d),
        quick=False,
        notes="bounded memory: the reference needs 32 GiB per B^3 tensor",
        compile_group="rkd_loss/float32",
    ),
]
