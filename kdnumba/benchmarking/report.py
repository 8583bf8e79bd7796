"""Turn a ``kdnumba bench`` result (the ``--json`` document) into tables."""

from __future__ import annotations

import math
import textwrap

MICRO = "\u00b5"
TIMES = "\u00d7"


def fmt_time(seconds) -> str:
    """``4.34 ms``, ``215 µs``, ``1.20 s``; ``-`` when missing."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        us = seconds * 1e6
        return f"{us:.1f} {MICRO}s" if us < 100 else f"{us:.0f} {MICRO}s"
    if seconds < 1.0:
        ms = seconds * 1e3
        return f"{ms:.2f} ms" if ms < 10 else (f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms")
    return f"{seconds:.2f} s"


def fmtratio(x) -> str:
    """``25.2×``, ``1.17×``; ``-`` when missing."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}{TIMES}" if x < 10 else f"{x:.1f}{TIMES}"


def _min(timing) -> float | None:
    return None if timing is None else timing["min_s"]


def ratio(num, den):
    """``num / den``; ``None`` when either is missing or ``den <= 0``."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _has_gemm(doc) -> bool:
    return any(c.get("gemm_bound") for c in doc["cases"])


def _columns(doc) -> list[str]:
    cols = ["case", "kdnumba min", "kdnumba median", "NumPy", "PyTorch",
            "NumPy/kdnumba", "PyTorch/kdnumba", "copy bound hot", "copy bound DRAM",
            "kdnumba/hot", "kdnumba/DRAM"]
    if _has_gemm(doc):
        cols += ["GEMM bound", "kdnumba/GEMM"]
    cols += ["compile cold", "cached load"]
    return cols


def _rows(doc) -> list[list[str]]:
    rows = []
    gemm = _has_gemm(doc)
    for c in doc["cases"]:
        np_min = _min(c.get("numpy"))
        torch_min = _min(c.get("torch"))
        mem = c.get("memory_bound") or {}
        comp = c.get("compile") or {}
        flag = " (!)" if c.get("disagrees") else ""
        entries = [(c["name"] + flag, c["kdnumba"], mem, c.get("gemm_bound") or {})]
        for label, timing in (c.get("variants") or {}).items():
            entries.append((f"  {label}", timing, mem, c.get("gemm_bound") or {}))
        for k, (label, timing, mem_, gb) in enumerate(entries):
            kd = timing["min_s"]
            row = [label, fmt_time(kd), fmt_time(timing["median_s"]),
                   fmt_time(np_min) if k == 0 else "",
                   fmt_time(torch_min) if k == 0 else "",
                   fmtratio(ratio(np_min, kd)), fmtratio(ratio(torch_min, kd)),
                   fmt_time(mem_.get("cache_hot_s")) if k == 0 else "",
                   fmt_time(mem_.get("dram_s")) if k == 0 else "",
                   fmtratio(ratio(kd, mem_.get("cache_hot_s"))),
                   fmtratio(ratio(kd, mem_.get("dram_s")))]
            if gemm:
                row += [fmt_time(gb.get("bound_s")) if k == 0 else "",
                        fmtratio(ratio(kd, gb.get("bound_s")))]
            if k == 0:
                row += [fmt_time(comp.get("cold_s")), fmt_time(comp.get("cached_s"))]
            else:
                row += ["", ""]
            rows.append(row)
    return rows


def machine_lines(doc) -> list[str]:
    m = doc["machine"]
    b = doc.get("bounds") or {}
    lines = [
        f"date: {m['date']}",
        f"machine: {m['cpu']}, {m['cores']} cores usable, {m['platform']}",
        f"threads: numba {m['numba_threads']} ({m['threading_layer'] or 'no parallel layer yet'})"
        + (f", torch {doc['settings']['torch_threads']}" if doc["settings"].get("torch_threads")
           else ""),
        f"versions: python {m['python']}, numpy {m['numpy']}, numba {m['numba']}, "
        f"llvmlite {m['llvmlite']}, torch {m['torch'] or 'not installed'}, "
        f"kdnumba {m['kdnumba']}",
    ]
    load = m.get("load_average") or {}
    if load.get("before") is not None:
        busy = max(load["before"], load.get("after") or 0) > 0.5 * m["cores"]
        lines.append(f"load average (1 min): {load['before']:.1f} before, "
                     f"{load.get('after', float('nan')):.1f} after the run on {m['cores']} cores"
                     + (" -- other processes competed for the cores: every time is "
                        "inflated, medians most; compare minima" if busy else ""))
    dram = b.get("dram")
    if dram:
        lines.append(f"DRAM copy bandwidth (read 2 + write 1, {dram['bytes'] / 2**30:.2f} GiB): "
                     f"{dram['gbps']:.1f} GB/s")
    for dtype, g in (b.get("gemm") or {}).items():
        lines.append(f"np.matmul peak ({dtype}, n={g['n']}): {g['gflops']:.0f} GFLOP/s")
    s = doc["settings"]
    rounds = f" in {s['rounds']} rounds" if s.get("rounds") else ""
    lines.append(f"timing: min and median of >= {s['min_repeats']} repeats{rounds} "
                 f"(>= {s['min_time_s']} s per implementation){', quick run' if s['quick'] else ''}; "
                 "ratios use the minima")
    return lines


def _compile_legend(doc) -> str:
    if (doc.get("settings") or {}).get("compile_method") == "first call in this process":
        return ("compile / cached: the first call in this run's process, which compiled the "
                "kernel or loaded it from the disk cache (Numba's dispatcher statistics tell "
                "which); cases sharing a kernel show it once per kernel.")
    return ("compile: first call in a fresh process with an empty NUMBA_CACHE_DIR; "
            "cached: first call in a second fresh process once that cache exists.")


def _legend(doc) -> str:
    return ("NumPy/kdnumba, PyTorch/kdnumba: how many times faster kdnumba is. "
            "copy bound: time of a parallel Numba read-2-write-1 kernel moving the case's "
            "bytes, cache-hot (same size, repeated) and from DRAM (>= 1 GiB stream "
            "bandwidth); kdnumba/hot, kdnumba/DRAM: how far from it (1.00x = at the bound). "
            + _compile_legend(doc)
            + " Indented rows are kdnumba variants of the case above "
              "(out=: preallocated gradient).")


#: Columns of the terminal table (the Markdown table has all), short names.
_TEXT_COLUMNS = {
    "kdnumba min": "kd min", "kdnumba median": "kd median", "NumPy": "NumPy",
    "PyTorch": "PyTorch", "NumPy/kdnumba": "NumPy/kd", "PyTorch/kdnumba": "torch/kd",
    "kdnumba/hot": "kd/hot", "kdnumba/DRAM": "kd/DRAM", "kdnumba/GEMM": "kd/GEMM",
    "compile cold": "compile", "cached load": "cached",
}


def format_text(doc) -> str:
    """Terminal table: each case's name on its own line, its figures below."""
    cols = _columns(doc)
    keep = [i for i, c in enumerate(cols) if c in _TEXT_COLUMNS]
    head = [_TEXT_COLUMNS[cols[i]] for i in keep]
    rows = _rows(doc)
    cells = [[r[i] for i in keep] for r in rows]
    widths = [max(len(h), *(len(c[k]) for c in cells)) if cells else len(h)
              for k, h in enumerate(head)]
    indent = 10

    def line(label, values):
        return (label.ljust(indent) + "  ".join(v.rjust(w) for v, w in zip(values, widths))
                ).rstrip()

    out = ["kdnumba bench", *machine_lines(doc), "", line("", head),
           line("", ["-" * w for w in widths])]
    for r, c in zip(rows, cells):
        if r[0].startswith("  "):  # a variant: its label in the indent
            out.append(line("  " + r[0].strip(), c))
        else:
            out.append(r[0])
            out.append(line("", c))
    out += ["", _text_legend(doc)]
    out += _problems(doc)
    out.append(f"(finished in {doc['elapsed_s']:.1f} s; --json or --markdown for every "
               "column, including the bound times)")
    return "\n".join(out)


def _text_legend(doc) -> str:
    text = ("NumPy/kd, torch/kd: how many times faster kdnumba is than the NumPy reference and "
            "PyTorch CPU (forward + backward). kd/hot, kd/DRAM: kdnumba's time over the "
            "memory-copy bound (a parallel read-2-write-1 kernel moving the same bytes, "
            "cache-hot or at DRAM bandwidth); 1.00x = at the bound. "
            + _compile_legend(doc) + " out=: with a preallocated gradient.")
    return textwrap.fill(text, width=92)


def format_markdown(doc) -> str:
    """A Markdown section to paste into ``docs/benchmarks.md``."""
    cols = _columns(doc)
    rows = _rows(doc)
    out = [f"- {line}" for line in machine_lines(doc)]
    out += ["", "| " + " | ".join(cols) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in rows:
        cells = [r[0].replace("  ", "\u2003\u21b3 ", 1) if r[0].startswith("  ") else f"`{r[0]}`",
                 *r[1:]]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", _legend(doc)]
    out += _problems(doc)
    return "\n".join(out)


def _problems(doc) -> list[str]:
    lines = [f"error: family {family} not benchmarked, its cases failed to load: {msg}"
             for family, msg in (doc.get("load_errors") or {}).items()]
    compile_notes = {}
    for c in doc["cases"]:
        comp = c.get("compile") or {}
        for key in ("error", "skipped"):
            if key in comp:
                compile_notes[comp.get("group", c["name"])] = f"{key}: {comp[key]}"
    lines += [f"note: compile time of {group} not measured ({msg})"
              for group, msg in compile_notes.items()]
    for c in doc["cases"]:
        for what, msg in (c.get("errors") or {}).items():
            lines.append(f"note: {c['name']}: {what}: {msg}")
        if c.get("disagrees"):
            lines.append(f"note: {c['name']}: results disagree beyond tolerance: "
                         f"{c['agreement']}")
    return lines
