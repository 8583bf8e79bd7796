"""``kdnumba demo``: distillation end to end with nothing but NumPy and kdnumba.

On scikit-learn's bundled handwritten digits (8x8 images, 10 classes, no
download) -- or on your own ``.npz`` with arrays ``X`` and ``y`` -- it trains a
wide teacher once (cached on disk), then trains a small student on a small
labelled subset, alone and with each distillation strategy, over several seeds,
and reports test accuracy (mean +- std), training time, and the share of that
time spent inside kdnumba's strategy calls. A plot and a JSON file go to the
output folder.

The CLI (``kdnumba demo``) calls :func:`add_arguments` and :func:`run`;
``python -m kdnumba.demo`` works too. ``--scale`` runs another demo instead
(:mod:`kdnumba.demo_scale`): the teacher's outputs cached through Dask in a
sharded Zarr store, and students trained from it out of core.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

#: The strategies compared by default, in table order ("student" -- trained on the
#: labels alone -- is always run first as the baseline).
DEFAULT_STRATEGIES = ("kd", "selectivity", "contrastive", "hybrid", "relational", "dkd", "dist",
                      "sp", "crd")
ALL_STRATEGIES = ("student",) + DEFAULT_STRATEGIES
ALIASES = {"response": "kd", "distillation": "kd", "baseline": "student", "none": "student",
           "alone": "student", "neuron_selectivity": "selectivity", "rkd": "relational",
           "similarity_preserving": "sp"}
LABELS = {"student": "student alone", "dkd": "decoupled KD", "dist": "DIST",
          "kd": "response KD", "selectivity": "selectivity",
          "contrastive": "contrastive", "hybrid": "hybrid", "relational": "relational",
          "sp": "similarity SP", "crd": "CRD"}
EMBEDDING_LAYER = "embeddings"
_SPLIT_SEED = 20240521


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of a demo run (recorded in ``results.json``).

    The student is ``n_features -> student_hidden (ReLU, "embeddings") -> classes``;
    the teacher ``n_features -> teacher_hidden... -> student_hidden ("embeddings")
    -> classes``: its embedding layer has the student's width so that the
    strategies comparing activations neuron by neuron (selectivity) or row by row
    (contrastive) can pair them without a projection.
    """

    seeds: int = 10
    first_seed: int = 0
    epochs: int = 60
    train_size: int | None = 150
    test_fraction: float = 0.4
    batch_size: int = 32
    student_hidden: int = 32
    learning_rate: float = 1e-2
    teacher_hidden: tuple[int, ...] = (256, 256)
    teacher_epochs: int = 30
    teacher_learning_rate: float = 1e-3
    temperature: float = 8.0
    alpha: float = 0.3
    selectivity_weight: float = 0.01
    selectivity_metric: str = "variance"
    contrastive_weight: float = 0.3
    contrastive_temperature: float = 0.1
    relational_weight: float = 0.5
    dkd_alpha: float = 1.0  # mdistiller's CIFAR-100 DKD settings ...
    dkd_beta: float = 8.0
    dkd_temperature: float = 4.0
    dkd_warmup: int = 5  # ... with the warm-up scaled to 60 epochs (20 of mdistiller's 240)
    dist_beta: float = 2.0  # DIST's CIFAR-100 settings
    dist_gamma: float = 2.0
    dist_temperature: float = 4.0
    sp_weight: float = 0.3
    sp_gamma: float = 3000.0  # RepDistiller's SP weight (-b 3000)
    crd_weight: float = 0.45  # RepDistiller's CE + 0.8 CRD (-r 1 -a 0 -b 0.8) as a [0, 1] split
    crd_alpha: float = 1.0  # ... whose output term is the cross-entropy alone (-a 0: no KD)
    crd_negatives: int = 64  # K (RepDistiller 16384 of 50k rows; the student sees 150)
    crd_embed_dim: int = 32  # the heads' width (RepDistiller 128; the student's layer is 32)
    crd_temperature: float = 0.07  # nce_t
    crd_momentum: float = 0.5  # nce_m
    hybrid_members: tuple[tuple[str, float], ...] = (("kd", 0.5), ("relational", 0.25),
                                                     ("contrastive", 0.25))
    threads: int = 1


#: ``--quick``: the same comparison, smaller (a few seconds once Numba's cache is warm).
QUICK = dict(seeds=2, epochs=20, teacher_hidden=(128,), teacher_epochs=10)


class DemoError(Exception):
    """A user-facing problem (bad data file, bad option): message, exit code 2."""


# -- data ------------------------------------------------------------------------------
def load_dataset(path: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """``(X float32 (N, F), y int64 (N,) in [0, K), description)``."""
    if path is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DemoError("the digits demo needs scikit-learn: pip install 'kdnumba[demo]' "
                            "(or pass --data your.npz with arrays X and y)") from exc
        x, y = load_digits(return_X_y=True)
        return x.astype(np.float32), y.astype(np.int64), "scikit-learn digits (8x8, 10 classes)"
    if not os.path.isfile(path):
        raise DemoError(f"--data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = sorted(f.files)
            missing = [k for k in ("X", "y") if k not in f.files]
            if missing:
                raise DemoError(
                    f"{path} must contain arrays named 'X' (features, N x F) and 'y' (labels, N); "
                    f"missing {', '.join(repr(m) for m in missing)}; found "
                    f"{', '.join(repr(n) for n in names) or 'no arrays'}")
            x, y = f["X"], f["y"]
    except DemoError:
        raise
    except Exception as exc:
        raise DemoError(f"could not read {path} as an .npz file: {exc}") from exc
    if x.dtype.kind not in "fiu" or x.ndim != 2:
        raise DemoError(f"X in {path} must be a 2-D numeric array (N x F), got dtype "
                        f"{x.dtype.name}, shape {x.shape}")
    if not np.isfinite(x).all():
        raise DemoError(f"X in {path} contains NaN or inf values")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DemoError(f"y in {path} must be 1-D with one label per row of X "
                        f"({x.shape[0]}), got shape {y.shape}")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
            raise DemoError(
                f"y in {path} must hold class labels (integers), got non-integer floats")
    elif y.dtype.kind not in "iuUSb":
        raise DemoError(f"y in {path} must hold class labels, got dtype {y.dtype.name}")
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DemoError(f"y in {path} has a single class; classification needs at least two")
    if x.shape[0] < 4 * len(classes):
        raise DemoError(f"{path} has {x.shape[0]} rows for {len(classes)} classes: too few "
                        "to split into training and test sets")
    return (x.astype(np.float32), y_idx.astype(np.int64),
            f"{os.path.basename(path)} ({x.shape[0]} x {x.shape[1]}, {len(classes)} classes)")


@dataclass
class Split:
    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


def split_dataset(x, y, test_fraction: float) -> Split:
    """A fixed (seeded) test split; features standardised with the pool's statistics."""
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(x))
    n_test = max(len(np.unique(y)), int(round(test_fraction * len(x))))
    test, pool = order[:n_test], order[n_test:]
    mean = x[pool].mean(axis=0)
    std = x[pool].std(axis=0)
    std[std == 0] = 1.0
    scale = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return Split(scale(x[pool]), y[pool], scale(x[test]), y[test], int(y.max()) + 1)


# -- models and strategies ------------------------------------------------------------------
def _student(cfg: DemoConfig, n_features: int, n_classes: int, seed: int):
    from kdnumba.training import MLP
    return MLP([n_features, cfg.student_hidden, n_classes], layer_names=[EMBEDDING_LAYER, "logits"],
               learning_rate=cfg.learning_rate, seed=seed)


def _teacher_model(cfg: DemoConfig, n_features: int, n_classes: int):
    from kdnumba.training import MLP
    hidden = list(cfg.teacher_hidden)
    names = [f"hidden{i + 1}" for i in range(len(hidden))] + [EMBEDDING_LAYER, "logits"]
    return MLP([n_features, *hidden, cfg.student_hidden, n_classes], layer_names=names,
               learning_rate=cfg.teacher_learning_rate, seed=12345)


class Unavailable(Exception):
    """The strategy's class is not part of this build of kdnumba."""


def _lookup(class_name: str):
    import importlib

    import kdnumba
    for mod in (kdnumba, importlib.import_module("kdnumba.strategies")):
        if hasattr(mod, class_name):
            return getattr(mod, class_name)
    raise Unavailable(f"{class_name} is not available in this build of kdnumba")


def _enum(class_name: str, member: str):
    try:
        return getattr(_lookup(class_name), member)
    except Unavailable:
        return member.lower()


def build_strategy(name: str, cfg: DemoConfig, labels=None):
    """A fresh strategy object for ``name`` (``None`` for the label-only baseline).

    ``labels`` are the student's training labels: ``crd`` needs them (its
    memory has one row per training example and it draws negatives from the
    other classes); the other strategies ignore them."""
    t, a = cfg.temperature, cfg.alpha
    if name == "student":
        return None
    if name == "kd":
        return _lookup("DistillationLoss")(temperature=t, alpha=a)
    if name == "selectivity":
        return _lookup("NeuronSelectivityDistillationStrategy")(
            target_layer_name=EMBEDDING_LAYER, selectivity_weight=cfg.selectivity_weight,
            metric=_enum("SelectivityMetric", cfg.selectivity_metric.upper()),
            temperature=t, alpha=a)
    if name == "contrastive":
        return _lookup("ContrastiveDistillationStrategy")(
            embedding_layer_name=EMBEDDING_LAYER, contrastive_weight=cfg.contrastive_weight,
            temperature=cfg.contrastive_temperature, alpha=a, negatives_sample_size=0,
            mode=_enum("ContrastiveMode", "NT_XENT"), output_temperature=t)
    if name == "relational":
        return _lookup("RelationalDistillationStrategy")(
            layer_name=EMBEDDING_LAYER, relational_weight=cfg.relational_weight,
            temperature=t, alpha=a)
    if name == "sp":
        return _lookup("SimilarityPreservingStrategy")(
            layer_names=EMBEDDING_LAYER, sp_weight=cfg.sp_weight, gamma=cfg.sp_gamma,
            temperature=t, alpha=a)
    if name == "dkd":
        return _lookup("DecoupledDistillationStrategy")(
            alpha=cfg.dkd_alpha, beta=cfg.dkd_beta, temperature=cfg.dkd_temperature,
            warmup=cfg.dkd_warmup)
    if name == "dist":
        return _lookup("DISTStrategy")(beta=cfg.dist_beta, gamma=cfg.dist_gamma,
                                       temperature=cfg.dist_temperature)
    if name == "crd":
        cls = _lookup("CRDStrategy")
        if labels is None:
            raise ValueError("the crd strategy needs the training labels: "
                             "build_strategy('crd', cfg, labels=y_train)")
        return cls(len(labels), embedding_layer_name=EMBEDDING_LAYER, crd_weight=cfg.crd_weight,
                   n_negatives=cfg.crd_negatives, temperature=cfg.crd_temperature,
                   momentum=cfg.crd_momentum, alpha=cfg.crd_alpha, output_temperature=t,
                   embed_dim=cfg.crd_embed_dim, head_learning_rate=cfg.learning_rate,
                   labels=labels, seed=0)
    if name == "hybrid":
        hybrid = _lookup("HybridDistillationStrategy")
        members = [(build_strategy(member, cfg, labels), weight)
                   for member, weight in cfg.hybrid_members]
        return hybrid(strategies=members, temperature=t, alpha=a)
    raise ValueError(f"unknown strategy {name!r}")


def parse_strategies(values) -> list[str]:
    """``--strategy`` values (repeatable, comma lists, ``all``) -> canonical names,
    with ``student`` first."""
    names: list[str] = []
    for value in values or []:
        for part in str(value).split(","):
            part = part.strip().lower().replace("-", "_")
            if not part:
                continue
            if part == "all":
                names.extend(DEFAULT_STRATEGIES)
                continue
            part = ALIASES.get(part, part)
            if part not in ALL_STRATEGIES:
                raise DemoError(f"unknown strategy {part!r}; choose from "
                                f"{', '.join(ALL_STRATEGIES)} (or 'all')")
            names.append(part)
    if not names:
        names = list(DEFAULT_STRATEGIES)
    return ["student"] + [n for i, n in enumerate(names) if n != "student" and n not in names[:i]]


# -- running -----------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n: int):
    """Numba and BLAS limited to ``n`` threads: the demo's 32-row batches are far
    too small for threads to pay for their start-up."""
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=n)
    except Exception:  # threadpoolctl is optional (scikit-learn brings it)
        limits = contextlib.nullcontext()
    try:
        with limits:
            yield
    finally:
        numba.set_num_threads(before)


def _teacher(cfg: DemoConfig, split: Split, cache_dir: str | None, log) -> tuple:
    """Train (or load from the cache folder) the teacher; ``(model, seconds, loaded)``."""
    from kdnumba.training import MLP, Distiller, dataset_fingerprint
    key = hashlib.sha256(json.dumps({
        "x": dataset_fingerprint(split.x_pool), "y": dataset_fingerprint(split.y_pool),
        "hidden": list(cfg.teacher_hidden), "emb": cfg.student_hidden,
        "epochs": cfg.teacher_epochs, "lr": cfg.teacher_learning_rate,
        "batch": cfg.batch_size}).encode()).hexdigest()[:24]
    path = None if cache_dir is None else os.path.join(cache_dir, f"teacher-model-{key}.npz")
    if path is not None and os.path.exists(path):
        try:
            return MLP.load(path), 0.0, True
        except Exception as exc:  # a damaged file: retrain
            log(f"  (ignoring unreadable cached teacher {path}: {exc})")
    model = _teacher_model(cfg, split.x_pool.shape[1], split.n_classes)
    start = time.perf_counter()
    Distiller(model, epochs=cfg.teacher_epochs, batch_size=cfg.batch_size, seed=0,
              progress=None).fit(split.x_pool, split.y_pool)
    seconds = time.perf_counter() - start
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        model.save(path)
    return model, seconds, False


def _summary(values) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def run_demo(cfg: DemoConfig, strategies, *, data: str | None = None, out: str | None = None,
             plot: bool = True, use_cache: bool = True, log=print) -> dict:
    """Run the comparison and return the results (also written to ``out``)."""
    from kdnumba.training import TeacherCache, run_teacher

    wall_start = time.perf_counter()
    x, y, description = load_dataset(data)
    split = split_dataset(x, y, cfg.test_fraction)
    n_pool = len(split.x_pool)
    train_size = n_pool if cfg.train_size is None else min(cfg.train_size, n_pool)
    if train_size < 2:
        raise DemoError(f"--train-size must leave at least 2 training examples, got {train_size}")
    cache_dir = os.path.join(out, "cache") if (out is not None and use_cache) else None
    log(f"data: {description}; {n_pool} pool / {len(split.x_test)} test examples; the student "
        f"sees {train_size} labelled examples")

    with _threads(cfg.threads):
        teacher, teacher_s, loaded = _teacher(cfg, split, cache_dir, log)
        teacher_acc = float(np.mean(np.argmax(teacher.predict(split.x_test), 1) == split.y_test))
        log(f"teacher: {teacher}  test accuracy {teacher_acc:.4f} "
            + ("(loaded from cache)" if loaded else f"(trained in {teacher_s:.1f} s)"))
        if cache_dir is not None:
            pool_outputs = TeacherCache(cache_dir).get(teacher, split.x_pool, (EMBEDDING_LAYER,))
        else:
            pool_outputs = run_teacher(teacher, split.x_pool, (EMBEDDING_LAYER,))
        seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
        subsets = {s: np.sort(np.random.default_rng(s).choice(n_pool, train_size, replace=False))
                   for s in seeds}
        results = {}
        for name in strategies:
            results[name] = _run_strategy(name, cfg, split, pool_outputs, seeds, subsets, log)

    base = results.get("student", {})
    for name, r in results.items():
        if r["status"] == "ok" and base.get("status") == "ok":
            diffs = np.subtract(r["accuracies"], base["accuracies"])
            r["gain_mean"], r["gain_std"] = _summary(diffs)
            r["wins"] = int(np.sum(diffs > 0))
    report = {
        "data": description, "config": asdict(cfg), "train_size": train_size,
        "n_pool": n_pool, "n_test": int(len(split.x_test)), "seeds": seeds,
        "teacher": {"architecture": repr(teacher), "test_accuracy": teacher_acc,
                    "train_seconds": teacher_s, "loaded_from_cache": loaded},
        "strategies": results,
        "total_seconds": time.perf_counter() - wall_start,
    }
    for line in format_table(report):
        log(line)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        report["json_path"] = os.path.join(out, "results.json")
        report["plot_path"] = None
        if plot:
            report["plot_path"] = _plot(report, out, log)
        from kdnumba.training._atomic import atomic_write

        # Atomic like every file kdnumba writes: a crash never leaves half a report.
        atomic_write(report["json_path"],
                     lambda f: f.write(json.dumps(report, indent=2).encode()))
        log(f"results: {report['json_path']}")
        if report["plot_path"]:
            log(f"plot:    {report['plot_path']}")
    log(f"total time {report['total_seconds']:.1f} s")
    return report


def _run_strategy(name, cfg, split, pool_outputs, seeds, subsets, log) -> dict:
    from kdnumba.training import Distiller, TeacherOutputs
    record = {"label": LABELS[name], "status": "ok"}
    try:
        probe = build_strategy(name, cfg, labels=split.y_pool[subsets[seeds[0]]])
    except Unavailable as exc:
        log(f"  {LABELS[name]:<14} unavailable: {exc}")
        return {**record, "status": "unavailable", "reason": str(exc)}
    except Exception as exc:
        log(f"  {LABELS[name]:<14} FAILED to construct: {type(exc).__name__}: {exc}")
        return {**record, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    accs, curves, train_s, strat_s, first_s = [], [], 0.0, 0.0, None
    try:
        for seed in seeds:
            sub = subsets[seed]
            labels = split.y_pool[sub]
            strategy = probe if seed == seeds[0] else build_strategy(name, cfg, labels=labels)
            student = _student(cfg, split.x_pool.shape[1], split.n_classes, seed)
            teacher = TeacherOutputs(*pool_outputs.batch(sub)) if strategy is not None else None
            trainer = Distiller(student, teacher, strategy, batch_size=cfg.batch_size,
                                epochs=cfg.epochs, seed=seed, progress=False)
            if first_s is None:  # compile (or load from Numba's cache) outside the timings
                first_s = _warm_up(trainer, split, sub,
                                   build_strategy(name, cfg, labels=labels))
            history = trainer.fit(split.x_pool[sub], split.y_pool[sub],
                                  validation=(split.x_test, split.y_test))
            accs.append(history["val_accuracy"][-1])
            curves.append(history["val_accuracy"])
            train_s += history.total_seconds
            strat_s += history.strategy_seconds
    except Exception as exc:
        log(f"  {LABELS[name]:<14} FAILED: {type(exc).__name__}: {exc}")
        return {**record, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    mean, std = _summary(accs)
    log(f"  {LABELS[name]:<14} {mean:.4f} +- {std:.4f}  ({len(seeds)} seeds, {train_s:.1f} s)")
    return {**record, "strategy": repr(probe), "accuracies": accs, "mean": mean, "std": std,
            "train_seconds": train_s, "kdnumba_seconds": strat_s,
            "kdnumba_share": strat_s / train_s if train_s > 0 else math.nan,
            "first_call_seconds": first_s,
            "curve_mean": np.mean(curves, axis=0).tolist(),
            "curve_std": np.std(curves, axis=0).tolist()}


def _warm_up(trainer, split, sub, fresh) -> float:
    """One forward + loss call on a small batch; returns its duration (dominated by
    Numba compiling, or loading from its disk cache, the strategy's kernels).

    The losses come from ``fresh``, a throwaway strategy built like the trained
    one, so that the trained one's state (CRD's memory constants, set by its
    first batch) is untouched."""
    from kdnumba.training import Distiller
    from kdnumba.training.loop import start_batch
    rows = np.arange(min(len(sub), 8))
    idx = sub[rows]
    start = time.perf_counter()
    if fresh is not None:
        trainer = Distiller(trainer.student, trainer.teacher, fresh, layers=trainer.layers,
                            progress=False)
        start_batch(fresh, rows, split.y_pool[idx])
    s_out, s_acts = trainer.student.forward(split.x_pool[idx], collect=trainer.layers)
    t_out, t_acts = (None, None) if fresh is None else trainer.teacher.batch(rows)
    trainer.compute_losses(s_out, s_acts, t_out, t_acts, split.y_pool[idx])
    return time.perf_counter() - start


# -- reporting ---------------------------------------------------------------------------------
def format_table(report: dict) -> list[str]:
    """The results table as text lines."""
    n = len(report["seeds"])
    lines = ["", f"test accuracy over {n} seed{'s' if n != 1 else ''} "
                 f"(student trained on {report['train_size']} examples; teacher "
                 f"{report['teacher']['test_accuracy']:.4f})", ""]
    head = (f"{'strategy':<15} {'accuracy mean +- std':>21} {'vs alone':>9} {'wins':>5} "
            f"{'train s':>8} {'kdnumba %':>9} {'1st call s':>10}")
    lines += [head, "-" * len(head)]
    for name, r in report["strategies"].items():
        if r["status"] != "ok":
            lines.append(f"{r['label']:<15} {r['status']}: {r.get('reason', '')}")
            continue
        gain = "" if name == "student" else f"{r.get('gain_mean', math.nan):+.4f}"
        wins = "" if name == "student" or "wins" not in r else f"{r['wins']}/{n}"
        lines.append(f"{r['label']:<15} {r['mean']:>12.4f} +- {r['std']:.4f} {gain:>9} {wins:>5} "
                     f"{r['train_seconds']:>8.2f} {100 * r['kdnumba_share']:>8.1f}% "
                     f"{r['first_call_seconds']:>10.2f}")
    lines += ["", "vs alone: mean paired difference to the student alone (same seed, same data); "
                  "wins: seeds where it beats it;",
              "train s: training time summed over the seeds; kdnumba %: its share spent inside "
              "the strategy (kdnumba) calls, the rest is the NumPy MLP;",
              "1st call s: the first strategy call, outside the timings (Numba compiling the "
              "kernels, or loading them from its disk cache)."]
    return lines


def _plot(report: dict, out: str, log) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install 'kdnumba[demo]')")
        return None
    ok = {k: r for k, r in report["strategies"].items() if r["status"] == "ok"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(ok)
    for i, name in enumerate(names):
        r = ok[name]
        jitter = np.linspace(-0.12, 0.12, len(r["accuracies"])) if len(r["accuracies"]) > 1 else [0]
        ax1.scatter(i + np.asarray(jitter), r["accuracies"], s=14, alpha=0.5, color=f"C{i}")
        ax1.errorbar(i, r["mean"], yerr=r["std"], fmt="o", color=f"C{i}", capsize=6, ms=8)
        epochs = np.arange(1, len(r["curve_mean"]) + 1)
        mean, std = np.asarray(r["curve_mean"]), np.asarray(r["curve_std"])
        ax2.plot(epochs, mean, color=f"C{i}", label=r["label"])
        ax2.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.12)
    teacher_acc = report["teacher"]["test_accuracy"]
    for ax in (ax1, ax2):
        ax.axhline(teacher_acc, color="gray", ls="--", lw=1, label="teacher")
        ax.grid(alpha=0.3)
    ax1.text(len(names) - 0.5, teacher_acc, "teacher", ha="right", va="bottom", color="gray")
    ax1.set_xticks(range(len(names)), [ok[n]["label"] for n in names], rotation=20)
    ax1.set_ylabel("test accuracy")
    ax1.set_title(f"final test accuracy ({len(report['seeds'])} seeds, mean ± std)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy")
    ax2.set_title("learning curves (mean ± std over seeds)")
    lo = min([min(r["accuracies"]) for r in ok.values()] + [teacher_acc])
    ax2.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"kdnumba demo: {report['data']}, student trained on "
                 f"{report['train_size']} examples")
    fig.tight_layout()
    path = os.path.join(out, "demo.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``kdnumba demo`` subparser)."""
    d = DemoConfig()
    parser.add_argument("--strategy", action="append", metavar="NAME",
                        help="strategy to compare with the student alone (repeatable or comma "
                             f"list; default all: {', '.join(DEFAULT_STRATEGIES)})")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"number of seeds (default {d.seeds}; --quick {QUICK['seeds']})")
    parser.add_argument("--first-seed", type=int, default=0, metavar="S",
                        help="first seed (seeds are S, S+1, ...)")
    parser.add_argument("--epochs", type=int, default=None, metavar="E",
                        help=f"student epochs (default {d.epochs}; --quick {QUICK['epochs']})")
    parser.add_argument("--train-size", type=int, default=None, metavar="N",
                        help=f"labelled examples the student sees (default {d.train_size}; "
                             "0 = the whole training pool)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help=f"distillation temperature (default {d.temperature})")
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"weight of the hard-label term (default {d.alpha})")
    parser.add_argument("--out", default="kdnumba-demo", metavar="DIR",
                        help="folder for results.json, demo.png and the teacher cache "
                             "(default ./kdnumba-demo)")
    parser.add_argument("--data", default=None, metavar="PATH.npz",
                        help="your own dataset: an .npz with arrays X (N x F) and y (N labels)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced setting (2 seeds, few epochs, small teacher) "
                             "for smoke tests")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="Numba/BLAS threads (default 1: the batches are tiny)")
    parser.add_argument("--no-plot", action="store_true", help="do not write demo.png")
    parser.add_argument("--no-cache", action="store_true",
                        help="retrain the teacher and do not cache its outputs")
    scale = parser.add_argument_group(
        "--scale", "a teacher cache built through Dask into a Zarr store, students trained "
                   "from it out of core (needs pip install 'kdnumba[scale]')")
    scale.add_argument("--scale", action="store_true",
                       help="run the scale demo instead of the strategy comparison")
    scale.add_argument("--workers", type=int, default=2, metavar="N",
                       help="worker processes of the LocalCluster (default 2)")
    scale.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="use the Dask cluster at ADDRESS (tcp://host:8786) instead of a "
                            "LocalCluster; its workers must see --out")


def config_from_args(args) -> DemoConfig:
    cfg = DemoConfig(**QUICK) if getattr(args, "quick", False) else DemoConfig()
    updates = {}
    for opt, key, minimum in (("seeds", "seeds", 1), ("epochs", "epochs", 1),
                              ("threads", "threads", 1)):
        value = getattr(args, opt, None)
        if value is not None:
            if value < minimum:
                raise DemoError(f"--{opt} must be >= {minimum}, got {value}")
            updates[key] = value
    if getattr(args, "first_seed", None) is not None:
        if args.first_seed < 0:
            raise DemoError(f"--first-seed must be >= 0, got {args.first_seed}")
        updates["first_seed"] = args.first_seed
    if getattr(args, "train_size", None) is not None:
        if args.train_size < 0:
            raise DemoError(f"--train-size must be >= 0, got {args.train_size}")
        updates["train_size"] = args.train_size or None
    if getattr(args, "temperature", None) is not None:
        if not (math.isfinite(args.temperature) and args.temperature > 0):
            raise DemoError(f"--temperature must be a finite number > 0, got {args.temperature}")
        updates["temperature"] = args.temperature
    if getattr(args, "alpha", None) is not None:
        if not 0.0 <= args.alpha <= 1.0:
            raise DemoError(f"--alpha must be in [0, 1], got {args.alpha}")
        updates["alpha"] = args.alpha
    return replace(cfg, **updates)


def check_out(out: str | None) -> None:
    """``DemoError`` unless ``--out`` is (or can be made) a folder we can write in:
    probed before any work, so a bad path fails in a second, not after the run."""
    if out is None:
        return
    from kdnumba.training._atomic import probe_writable
    try:
        probe_writable(out)
    except OSError as exc:
        raise DemoError(f"--out {out!r} is not a writable folder: "
                        f"{exc.strerror or exc}") from None


def run(args) -> int:
    """Run the demo from parsed arguments; returns the exit code (0 ok, 1 a strategy
    failed, 2 bad data or options)."""
    if getattr(args, "scale", False):
        return run_scale(args)
    try:
        cfg = config_from_args(args)
        strategies = parse_strategies(getattr(args, "strategy", None))
        check_out(getattr(args, "out", "kdnumba-demo"))
        report = run_demo(cfg, strategies, data=getattr(args, "data", None),
                          out=getattr(args, "out", "kdnumba-demo"),
                          plot=not getattr(args, "no_plot", False),
                          use_cache=not getattr(args, "no_cache", False))
    except DemoError as exc:
        print(f"kdnumba demo: error: {exc}", file=sys.stderr)
        return 2
    failed = [r["label"] for r in report["strategies"].values() if r["status"] == "failed"]
    if failed:
        print(f"kdnumba demo: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_scale(args) -> int:
    """``--scale``: the teacher (trained or loaded as in the comparison) labels a
    noisy transfer set through Dask into sharded caches; students train from
    them (:func:`kdnumba.demo_scale.run_scale_demo`). Exit code 0, or 2 for bad
    options or a missing extra."""
    try:
        cfg = config_from_args(args)
        workers = getattr(args, "workers", 2)
        if workers < 1:
            raise DemoError(f"--workers must be >= 1, got {workers}")
        out = getattr(args, "out", "kdnumba-demo")
        check_out(out)
        x, y, description = load_dataset(getattr(args, "data", None))
        split = split_dataset(x, y, cfg.test_fraction)
        n_pool = len(split.x_pool)
        train_size = n_pool if cfg.train_size is None else min(cfg.train_size, n_pool)
        print(f"data: {description}; {n_pool} pool / {len(split.x_test)} test examples")
        cache_dir = None if getattr(args, "no_cache", False) else os.path.join(out, "cache")
        with _threads(cfg.threads):
            teacher, seconds, loaded = _teacher(cfg, split, cache_dir, print)
            print(f"teacher: {teacher} " + ("(loaded from cache)" if loaded
                                            else f"(trained in {seconds:.1f} s)"))
            labelled = np.sort(np.random.default_rng(cfg.first_seed).choice(
                n_pool, train_size, replace=False))
            try:
                from kdnumba import demo_scale
                demo_scale.run_scale_demo(
                    teacher, split.x_pool, split.y_pool, split.x_test, split.y_test, labelled,
                    student_factory=lambda seed: _student(cfg, split.x_pool.shape[1],
                                                          split.n_classes, seed),
                    out=os.path.join(out, "scale"), quick=getattr(args, "quick", False),
                    workers=workers, scheduler=getattr(args, "scheduler", None),
                    seed=cfg.first_seed)
            except ImportError as exc:
                raise DemoError(str(exc)) from None
    except DemoError as exc:
        print(f"kdnumba demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdnumba demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
