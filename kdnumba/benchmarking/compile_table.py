"""Time to first result: the cold-compile table of ``kdnumba bench --compile-only``.

For every registered loss and both float dtypes this measures what a new user
meets on the first call, in fresh processes (see :mod:`.compile_probe`):

* **cold**: the first call with an empty ``NUMBA_CACHE_DIR`` -- type
  inference, LLVM, writing the disk cache, one run;
* **cached**: the first call in a new process once that cache exists.

Each loss is measured in its own process, so each row also pays Numba's
one-off start-up work (loading its lowering registries, the first parallel
loop's runtime). A final row per dtype calls every loss once in *one* fresh
process, which is what a program using several losses pays in total.

The workload is the loss's first (headline) registry workload, re-typed to
each dtype: large enough to take the parallel build of a
:class:`kdnumba._policy.ParallelKernel`, as a training step would.
"""

from __future__ import annotations

import textwrap
import time

from kdnumba.benchmarking.compile_probe import measure_compile
from kdnumba.benchmarking.registry_cases import FIRST_CALL_DTYPES, first_call_cases


def measure(families=None, *, dtypes=FIRST_CALL_DTYPES, threads: int | None = None,
            together: bool = True, progress=None) -> dict:
    """The compile table of the registered losses of ``families`` (all by
    default) as a JSON-ready dict: ``rows`` (loss, family, dtype, cold_s,
    cached_s; or error) and ``together`` (per dtype: every loss once in one
    fresh process)."""
    say = progress or (lambda msg: None)
    started = time.perf_counter()
    cases = first_call_cases(families, dtypes)
    rows = []
    for k, case in enumerate(cases, 1):
        loss, dtype = case.name.split("/")[1:3]
        say(f"[{k}/{len(cases)}] first call of {loss} ({dtype}), empty cache then cached ...")
        row = {"loss": loss, "family": case.family, "dtype": dtype}
        try:
            row.update(measure_compile(case.name, family=case.family, threads=threads))
        except Exception as exc:  # one broken loss must not hide the others' figures
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    joint = {}
    if together:
        for dtype in sorted({r["dtype"] for r in rows}, key=FIRST_CALL_DTYPES.index):
            names = [c.name for c in cases if c.name.endswith("/" + dtype)]
            say(f"every loss once in one process ({dtype}) ...")
            try:
                joint[dtype] = measure_compile(names, threads=threads)
            except Exception as exc:
                joint[dtype] = {"error": f"{type(exc).__name__}: {exc}"}
    return {"rows": rows, "together": joint, "elapsed_s": time.perf_counter() - started}


def _fmt_s(value) -> str:
    return "-" if value is None else f"{value:.2f} s"


def table_rows(table: dict) -> list[list[str]]:
    """``[loss, dtype, cold, cached]`` strings, then one total row per dtype:
    the sum of the separate processes and the single-process figure."""
    out = []
    for r in table["rows"]:
        if "error" in r:
            out.append([r["loss"], r["dtype"], "error", r["error"]])
        else:
            out.append([r["loss"], r["dtype"], _fmt_s(r["cold_s"]), _fmt_s(r["cached_s"])])
    for dtype, joint in table.get("together", {}).items():
        own = [r for r in table["rows"] if r["dtype"] == dtype and "error" not in r]
        if len(own) > 1:
            out.append([f"sum of the {len(own)} rows", dtype,
                        _fmt_s(sum(r["cold_s"] for r in own)),
                        _fmt_s(sum(r["cached_s"] for r in own))])
        if "error" in joint:
            out.append(["all in one process", dtype, "error", joint["error"]])
        else:
            out.append(["all in one process", dtype, _fmt_s(joint["cold_s"]),
                        _fmt_s(joint["cached_s"])])
    return out


HEADER = ["loss", "dtype", "compile cold", "cached load"]

LEGEND = ("compile cold: first call in a fresh process with an empty NUMBA_CACHE_DIR "
          "(compilation + writing the cache + one run); cached load: first call in a "
          "second fresh process once that cache exists. Neither includes `import kdnumba`. "
          "Each loss runs in its own processes, so each row includes Numba's one-off "
          "start-up; 'all in one process' calls every loss once in one fresh process.")


def _machine_line(table: dict) -> str:
    m = table.get("machine") or {}
    if not m:
        return ""
    return (f"{m['date']}, {m['cpu']}, {m['cores']} cores, numba {m['numba']}, "
            f"kdnumba {m['kdnumba']}")


def format_text(table: dict) -> str:
    """The table for a terminal."""
    rows = table_rows(table)
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h)
              for k, h in enumerate(HEADER)]
    lines = ["kdnumba bench --compile-only", _machine_line(table), ""]
    lines += ["  ".join(h.ljust(w) if k < 2 else h.rjust(w)
                       for k, (h, w) in enumerate(zip(HEADER, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if k < 2 else c.rjust(w)
                               for k, (c, w) in enumerate(zip(r, widths))))
    lines += ["", textwrap.fill(LEGEND, width=92),
              f"(finished in {table['elapsed_s']:.1f} s)"]
    return "\n".join(lines)


def format_markdown(table: dict) -> str:
    """The table as Markdown, for ``docs/benchmarks.md``."""
    rows = table_rows(table)
    lines = [f"- {_machine_line(table)}", "", "| " + " | ".join(HEADER) + " |",
             "|---|---|---:|---:|"]
    for loss, dtype, cold, cached in rows:
        name = loss if loss.startswith(("sum", "all")) else f"`{loss}`"
        lines.append(f"| {name} | {dtype} | {cold} | {cached} |")
    lines += ["", LEGEND]
    return "\n".join(lines)
