"""Distillation training outside autograd frameworks.

* :mod:`~kdnumba.training.protocol` -- what a student/teacher must implement
  (``forward(x, collect)``, ``backward(output_grad, intermediate_grads)``,
  ``step()``, ``predict(x)``).
* :class:`Distiller` -- the loop: teacher and student forward per minibatch,
  output + intermediate losses of any strategy (hybrids included), backward with
  gradients injected at intermediate layers, update; metrics, early stopping,
  seeded shuffling, a progress bar on long runs; atomic checkpoints and
  resuming (``fit(..., checkpoint=path, resume=True)``).
* :class:`TeacherCache` / :class:`TeacherOutputs` -- the teacher run once, kept
  on disk (``.npz``, atomic, checksummed, safe to share between threads and
  processes) for offline distillation.
* :func:`build_teacher_cache` / :func:`open_teacher_cache` -- the teacher run
  once at corpus scale: a sharded Zarr store (dense or top-K outputs, named
  activations, a manifest), built chunk by chunk across Dask workers or
  locally, crash-safe and resumable; :class:`ShardedTeacherCache` is read out
  of core by the :class:`Distiller` (``pip install 'kdnumba[scale]'``; Dask
  and Zarr are imported only when used).
* :class:`MLP` -- a NumPy multilayer perceptron implementing the protocol: the
  demo's student and teacher, and a template for your own model.
"""

from kdnumba.training.cache import TeacherCache, TeacherOutputs, dataset_fingerprint, run_teacher
from kdnumba.training.loop import (
    BatchLosses,
    Distiller,
    EarlyStopping,
    TrainingDivergedError,
    TrainingHistory,
    cross_entropy_and_accuracy,
    is_intermediate,
    required_layers,
)
from kdnumba.training.mlp import MLP
from kdnumba.training.protocol import Student, Teacher
from kdnumba.training.sharded_cache import (
    ShardedTeacherCache,
    build_teacher_cache,
    open_teacher_cache,
    topk_outputs,
)

__all__ = [
    "BatchLosses",
    "Distiller",
    "EarlyStopping",
    "MLP",
    "ShardedTeacherCache",
    "Student",
    "Teacher",
    "TeacherCache",
    "TeacherOutputs",
    "TrainingDivergedError",
    "TrainingHistory",
    "build_teacher_cache",
    "cross_entropy_and_accuracy",
    "dataset_fingerprint",
    "is_intermediate",
    "open_teacher_cache",
    "required_layers",
    "run_teacher",
    "topk_outputs",
]
