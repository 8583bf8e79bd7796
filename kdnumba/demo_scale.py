"""``kdnumba demo --scale``: a teacher cache built through Dask, a student trained from it.

The demo's teacher (trained on the digits pool, as in ``kdnumba demo``) labels
an unlabelled *transfer set* -- the pool's images with Gaussian noise,
``--transfer-copies`` noisy copies of each -- once, on a Dask cluster (a
two-worker ``LocalCluster`` here; ``--scheduler tcp://host:8786`` for a real
one), into a sharded Zarr store: top-K and dense. Students then train from the
stores out of core, without labels (``DistillationLoss`` with ``alpha=0``;
with the top-K store that is :func:`~kdnumba.functional.sparse_kd_loss`), and
are compared on the test set with a student trained on the labelled subset
alone. :mod:`kdnumba.demo` loads the data and the teacher and calls
:func:`run_scale_demo`.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

#: --scale settings: (full, --quick)
SCALE = {"transfer_copies": (16, 4), "noise": (0.3, 0.3), "topk": (3, 3),
         "chunk_rows": (2048, 1024), "epochs": (15, 4), "batch_size": (64, 64),
         "temperature": (4.0, 4.0)}


def _start_client(scheduler: str | None, workers: int, log):
    """``(client, cluster or None)``: a client of the cluster at ``scheduler``, or
    of a new ``LocalCluster`` of ``workers`` single-threaded processes."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ImportError("kdnumba demo --scale needs dask.distributed and zarr: "
                          "pip install 'kdnumba[scale]'") from exc
    if scheduler:
        log(f"dask: connecting to the cluster at {scheduler}")
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=40)
    log(f"dask: a LocalCluster of {workers} worker processes (1 thread each)")
    return Client(cluster), cluster


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x), axis=1) == y))


def run_scale_demo(teacher, x_pool, y_pool, x_test, y_test, labelled, *, student_factory,
                   out: str, quick: bool = False, workers: int = 2,
                   scheduler: str | None = None, seed: int = 0, log=print) -> dict:
    """Build the top-K and dense caches of ``teacher`` over the noisy transfer set
    through Dask, train a student from each out of core, and one on
    ``labelled`` (indices into the pool) alone; returns the report (also
    written to ``out/scale-results.json``).

    ``student_factory(seed)`` makes a fresh student (the demo's MLP).
    """
    from kdnumba import DistillationLoss
    from kdnumba.training import Distiller, build_teacher_cache
    from kdnumba.training._atomic import atomic_write

    q = 1 if quick else 0
    settings = {k: v[q] for k, v in SCALE.items()}
    rng = np.random.default_rng(seed)
    copies = settings["transfer_copies"]
    x_transfer = np.concatenate(
        [x_pool] + [x_pool + settings["noise"] * rng.standard_normal(x_pool.shape)
                    .astype(x_pool.dtype) for _ in range(copies)])
    log(f"transfer set: {len(x_transfer)} unlabelled rows (the pool and {copies} noisy "
        f"copies); chunks of {settings['chunk_rows']} rows")
    os.makedirs(out, exist_ok=True)
    # top-K below C, or the "compressed" store would hold every logit
    n_classes = int(np.shape(teacher.predict(x_pool[:1]))[1])
    settings["topk"] = max(1, min(settings["topk"], n_classes - 1))
    report = {"transfer_rows": len(x_transfer), "settings": settings, "stores": {}}
    client, cluster = _start_client(scheduler, workers, log)
    try:
        for kind, topk in (("topk", settings["topk"]), ("dense", None)):
            path = os.path.join(out, f"teacher-cache-{kind}")
            start = time.perf_counter()
            # overwrite: the demo's teacher may have been retrained since the last run
            cache = build_teacher_cache(teacher, x_transfer, path, topk=topk,
                                        chunk_rows=settings["chunk_rows"], client=client,
                                        overwrite=True)
            seconds = time.perf_counter() - start
            report["stores"][kind] = {"path": path, "seconds": seconds,
                                      "bytes": cache.nbytes_on_disk(),
                                      "chunks": cache.n_chunks}
            log(f"  built {cache!r} in {seconds:.1f} s, {cache.nbytes_on_disk() / 1e6:.2f} MB")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

    from kdnumba.training import open_teacher_cache
    results = {}
    epochs, batch = settings["epochs"], settings["batch_size"]
    alone = student_factory(seed)
    Distiller(alone, epochs=epochs * 4, batch_size=batch, seed=seed,
              progress=False).fit(x_pool[labelled], y_pool[labelled])
    results["student alone"] = {"accuracy": _accuracy(alone, x_test, y_test),
                                "data": f"{len(labelled)} labelled rows"}
    for kind in ("topk", "dense"):
        cache = open_teacher_cache(report["stores"][kind]["path"])
        student = student_factory(seed)
        strategy = DistillationLoss(temperature=settings["temperature"], alpha=0.0)
        history = Distiller(student, cache, strategy, epochs=epochs, batch_size=batch,
                            seed=seed, progress=False).fit(x_transfer)
        name = (f"from top-{settings['topk']} cache (sparse_kd_loss)" if kind == "topk"
                else "from dense cache (kd_loss)")
        results[name] = {"accuracy": _accuracy(student, x_test, y_test),
                         "data": f"{len(x_transfer)} unlabelled rows",
                         "train_seconds": history.total_seconds}
    report["teacher_accuracy"] = _accuracy(teacher, x_test, y_test)
    report["results"] = results
    log("")
    log(f"test accuracy (teacher {report['teacher_accuracy']:.4f}):")
    for name, r in results.items():
        extra = f", {r['train_seconds']:.1f} s" if "train_seconds" in r else ""
        log(f"  {name:<40} {r['accuracy']:.4f}  ({r['data']}{extra})")
    path = os.path.join(out, "scale-results.json")
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=2).encode()))
    log(f"results: {path}")
    return report
