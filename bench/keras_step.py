"""One Keras Distiller train step, JAX backend: kdnumba's logits loss vs keras.ops.

    python bench/keras_step.py [--batch 4096] [--classes 1000] [--repeats 30]

The issue's done-criterion (#17): a ``keras.distillation.Distiller`` step whose
distillation loss is ``kdnumba.keras.LogitsDistillation`` is no slower than
the same step with the Hinton loss written in ``keras.ops`` (what Keras's own
``LogitsDistillation`` should compute; its default is not that loss, see
docs/keras.md). Both Distillers have the same teacher, student, optimizer,
student loss and data; only the distillation loss differs. Each step is
``train_on_batch`` on one (B, features) batch after warm-up (compilation),
timed with ``time.perf_counter``. The two Distillers step in turn
(``--repeats`` rounds), so load from other processes on a shared machine
hits both alike; reported: the median and minimum step of each (wall-clock),
the process CPU time per step (all threads), the median of the per-round
ratios, the load average before and after, and the loss-only
forward+backward (``jax.jit(value_and_grad)``) of each for context.

kdnumba's logits loss runs as an XLA FFI handler (``kdnumba.jax.ffi_target``);
``--callback`` adds a third Distiller whose train step was traced with
``KDNUMBA_JAX_FFI=0``, i.e. through ``jax.pure_callback`` (the path every
other loss takes), to show what the FFI path saves.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

import keras  # noqa: E402

import kdnumba.keras as kdk  # noqa: E402
from kdnumba.benchmarking.machine import cpu_model  # noqa: E402

ops = keras.ops


class KerasOpsLogits(keras.distillation.DistillationLoss):
    """The Hinton loss in keras.ops: ``T^2 mean_i KL(softmax(t_i/T) || softmax(s_i/T))``."""

    def __init__(self, temperature=4.0):
        self.temperature = temperature

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        T = self.temperature
        lt = ops.log_softmax(ops.stop_gradient(teacher_outputs) / T, axis=-1)
        ls = ops.log_softmax(student_outputs / T, axis=-1)
        return T * T * ops.mean(ops.sum(ops.exp(lt) * (lt - ls), axis=-1))


def models(features: int, classes: int, hidden: int):
    keras.utils.set_random_seed(0)
    x = keras.Input((features,))
    teacher = keras.Model(x, keras.layers.Dense(classes)(
        keras.layers.Dense(hidden, activation="relu")(x)), name="teacher")
    student = keras.Model(x, keras.layers.Dense(classes)(x), name="student")
    return teacher, student


def build(loss, args):
    teacher, student = models(args.features, args.classes, args.hidden)
    distiller = keras.distillation.Distiller(teacher, student, loss, student_loss_weight=0.5)
    distiller.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return distiller


def warm_up(distiller, x, y, args, env=None):
    """Compile ``distiller``'s train step (with ``env`` set while it is traced)."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        for _ in range(args.warmup):
            distiller.train_on_batch(x, y)
    finally:
        for k, value in saved.items():
            if value is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = value


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_interleaved(distillers: dict, x, y, args) -> tuple[dict, dict]:
    """``(name -> [wall seconds per step], name -> [CPU seconds per step])``,
    the Distillers' steps taken in turn, so that load from other processes on
    a shared machine hits all of them alike."""
    times = {name: [] for name in distillers}
    cpu = {name: [] for name in distillers}
    for _ in range(args.repeats):
        for name, d in distillers.items():
            cpu_start, start = cpu_seconds(), time.perf_counter()
            d.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - cpu_start)
    return times, cpu


def time_loss_only(loss, s, t, repeats) -> float:
    import jax

    f = jax.jit(jax.value_and_grad(lambda s_, t_: loss.compute_loss(t_, s_)))
    jax.block_until_ready(f(s, t))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(s, t))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--callback", action="store_true",
                        help="also time kdnumba through jax.pure_callback (KDNUMBA_JAX_FFI=0)")
    args = parser.parse_args()
    if keras.backend.backend() != "jax":
        raise SystemExit("run with KERAS_BACKEND=jax (the criterion is the JAX step)")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.features)).astype(np.float32)
    y = rng.integers(0, args.classes, args.batch)
    s = rng.standard_normal((args.batch, args.classes)).astype(np.float32)
    t = rng.standard_normal((args.batch, args.classes)).astype(np.float32)
    losses = {"keras.ops": KerasOpsLogits(args.temperature),
              "kdnumba": kdk.LogitsDistillation(temperature=args.temperature)}

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); keras {keras.__version__}, "
          f"backend jax; {time.strftime('%Y-%m-%d %H:%M %Z')}; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"Distiller step: B={args.batch}, C={args.classes}, student Dense({args.features}->"
          f"{args.classes}), teacher Dense({args.features}->{args.hidden}->{args.classes}), "
          f"T={args.temperature}, median of {args.repeats} steps")
    distillers = {name: build(loss, args) for name, loss in losses.items()}
    for d in distillers.values():
        warm_up(d, x, y, args)
    if args.callback:
        d = build(kdk.LogitsDistillation(temperature=args.temperature), args)
        warm_up(d, x, y, args, env={"KDNUMBA_JAX_FFI": "0"})
        distillers["callback"] = d
    step, cpu = time_interleaved(distillers, x, y, args)
    alone = {name: time_loss_only(loss, s, t, args.repeats) for name, loss in losses.items()}
    for name in distillers:
        extra = (f"   loss fwd+bwd alone {1e3 * alone[name]:7.2f} ms" if name in alone
                 else "   (kdnumba through jax.pure_callback)")
        print(f"  {name:10s} step median {1e3 * statistics.median(step[name]):8.2f} ms  "
              f"min {1e3 * min(step[name]):8.2f} ms  "
              f"CPU/step median {1e3 * statistics.median(cpu[name]):7.2f} ms{extra}")
    paired = [a / b for a, b in zip(step["kdnumba"], step["keras.ops"])]
    ratio = statistics.median(paired)
    print(f"  ratio kdnumba / keras.ops step time (median of {len(paired)} paired steps): "
          f"{ratio:.3f} ({'no slower' if ratio <= 1.0 else 'SLOWER'}); "
          f"ratio of minima {min(step['kdnumba']) / min(step['keras.ops']):.3f}")
    print(f"  load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
