"""Benchmark of the sharded teacher cache (issue #18); the figures in docs/scale.md.

    python3 bench/scale_cache.py [--rows 1000000] [--repeats 2] [--out DIR] [--json FILE]

1. Build throughput (rows/s): a NumPy MLP teacher (F=64 -> 256 -> C=1000,
   float32) over ``--rows`` rows with top-K=32, chunk_rows=4096, in one
   process (``client=None``; NumPy's BLAS uses its default threads) and on a
   ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
   (cluster start-up not counted). Best of ``--repeats`` (each a fresh store).
2. Disk bytes: the top-K store as built; a dense store of ``--dense-rows`` rows
   (default 100k: 400 MB of logits) measured and scaled linearly to ``--rows``.
3. Epoch time of a Distiller (student 64 -> 32 -> 1000, DistillationLoss,
   batch 512), reading out of core against from memory, same minibatches:
   dense: the 100k-row dense store against TeacherOutputs of the same arrays;
   top-K: the top-K store (2 decoded chunks kept) against the same view with
   every chunk held decoded in RAM (``keep_chunks=n_chunks``, after a warm-up
   pass), i.e. the same loop without reading or verifying. Best of
   ``--repeats``, memory and store runs interleaved. The store is read through
   the OS page cache (just written). ``--epochs-only`` reuses the stores in
   ``--out``.

Not a pytest module (it runs for minutes); pytest does not collect it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time

import numpy as np

from kdnumba.benchmarking.machine import cpu_model

F, C, K, CHUNK = 64, 1000, 32, 4096


def make_teacher():
    from kdnumba.training import MLP
    return MLP([F, 256, C], layer_names=["hidden", "logits"], seed=1)


def make_inputs(rows: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, F), dtype=np.float32)


def timed_build(teacher, x, path, **kw) -> float:
    from kdnumba.training import build_teacher_cache
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    build_teacher_cache(teacher, x, path, chunk_rows=CHUNK, progress=False, **kw)
    return time.perf_counter() - t0


def epoch_seconds(sources, x, y, repeats: int, chunk_rows: int) -> list[float]:
    """Best epoch time of each teacher source, runs interleaved (A, B, A, B, ...)
    so that a load spike from the machine's other users hits both alike."""
    from kdnumba import DistillationLoss
    from kdnumba.training import MLP, Distiller
    best = [float("inf")] * len(sources)
    for r in range(repeats + 1):  # the first round compiles / warms up: not counted
        for j, source in enumerate(sources):
            student = MLP([F, 32, C], layer_names=["hidden", "logits"], seed=0)
            d = Distiller(student, source, DistillationLoss(temperature=4.0, alpha=0.5),
                          batch_size=512, epochs=1, seed=r, shuffle_chunk_rows=chunk_rows,
                          progress=False)
            history = d.fit(x, y)
            if r:
                best[j] = min(best[j], history["epoch_seconds"][0])
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dense-rows", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for the stores (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the figures here too")
    p.add_argument("--epochs-only", action="store_true",
                   help="skip the builds: time the epochs on the stores already in --out")
    args = p.parse_args(argv)

    from distributed import Client, LocalCluster

    from kdnumba.training import open_teacher_cache

    out = args.out or tempfile.mkdtemp(prefix="kdnumba-scale-bench-")
    os.makedirs(out, exist_ok=True)
    teacher = make_teacher()
    x = make_inputs(args.rows)
    y = np.random.default_rng(1).integers(0, C, args.rows)
    report = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(),
              "cores": os.cpu_count(), "rows": args.rows, "classes": C, "topk": K,
              "features": F, "chunk_rows": CHUNK, "repeats": args.repeats,
              "note": "machine shared with other engineers working concurrently; best of N"}

    topk_path = os.path.join(out, "topk")
    dense_path = os.path.join(out, "dense")
    dense_rows = min(args.dense_rows, args.rows)
    if args.epochs_only:
        return epochs(args, report, x, y, topk_path, dense_path, dense_rows)

    # 1. build throughput
    single = min(timed_build(teacher, x, topk_path, topk=K) for _ in range(args.repeats))
    report["build_single_process_s"] = single
    report["build_single_process_rows_per_s"] = args.rows / single
    print(f"build, one process:        {single:7.2f} s  {args.rows / single:10.0f} rows/s",
          flush=True)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        two = min(timed_build(teacher, x, topk_path, topk=K, client=client)
                  for _ in range(args.repeats))
    report["build_cluster_2_workers_s"] = two
    report["build_cluster_2_workers_rows_per_s"] = args.rows / two
    print(f"build, 2-worker cluster:   {two:7.2f} s  {args.rows / two:10.0f} rows/s", flush=True)

    # 2. disk bytes
    topk_cache = open_teacher_cache(topk_path)
    report["topk_store_bytes"] = topk_cache.nbytes_on_disk()
    timed_build(teacher, x[:dense_rows], dense_path)
    dense_cache = open_teacher_cache(dense_path)
    report["dense_rows_measured"] = dense_rows
    report["dense_store_bytes_measured"] = dense_cache.nbytes_on_disk()
    report["dense_store_bytes_scaled"] = int(dense_cache.nbytes_on_disk() * args.rows / dense_rows)
    report["dense_raw_bytes"] = args.rows * C * 4
    print(f"disk: top-K {report['topk_store_bytes'] / 1e6:.1f} MB; dense "
          f"{report['dense_store_bytes_measured'] / 1e6:.1f} MB for {dense_rows} rows -> "
          f"{report['dense_store_bytes_scaled'] / 1e9:.2f} GB scaled to {args.rows}", flush=True)

    report = epochs(args, report, x, y, topk_path, dense_path, dense_rows)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return report


def epochs(args, report, x, y, topk_path, dense_path, dense_rows) -> dict:
    """3. epoch time, store vs memory."""
    from kdnumba.training import TeacherOutputs, open_teacher_cache
    dense_cache = open_teacher_cache(dense_path)
    topk_cache = open_teacher_cache(topk_path)
    outputs, acts = dense_cache.batch(slice(None))
    xd, yd = x[:dense_rows], y[:dense_rows]
    mem, store = epoch_seconds([TeacherOutputs(outputs, acts), dense_cache], xd, yd,
                               args.repeats, CHUNK)
    report.update(dense_epoch_memory_s=mem, dense_epoch_store_s=store,
                  dense_epoch_ratio=store / mem)
    print(f"epoch, dense {dense_rows} rows: store {store:.2f} s, memory {mem:.2f} s, "
          f"ratio {store / mem:.2f}", flush=True)
    del outputs, acts
    resident = open_teacher_cache(topk_path, keep_chunks=topk_cache.n_chunks)
    resident.verify()  # every chunk decoded into RAM once
    mem, store = epoch_seconds([resident, open_teacher_cache(topk_path)], x, y, args.repeats,
                               CHUNK)
    del resident
    report.update(topk_epoch_memory_s=mem, topk_epoch_store_s=store,
                  topk_epoch_ratio=store / mem)
    print(f"epoch, top-{K} {args.rows} rows: store {store:.2f} s, memory {mem:.2f} s, "
          f"ratio {store / mem:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
