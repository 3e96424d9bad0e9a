"""Turn worker measurements into result rows (ratios to onnxruntime fp32, bandwidth floor) and a
markdown table. Pure functions: no measuring, no I/O (tested in tests/test_bench_utils.py).

Row keys: model, variant, size_mb, prefill_p50_ms, prefill_p95_ms, decode_ms_ctx128,
decode_ms_ctx1024, peak_rss_mb, accuracy (None when the model is untrained or the row failed),
``vs_ort_fp32`` (each metric / the same model's ort-fp32 value), ``floor`` (bandwidth floor per
decode context and the fraction of it reached), ``notes``, ``error``.
"""

from __future__ import annotations

from statistics import median

from benchmarks.measure import ActiveParams, decode_floor_ms, floor_fraction

METRICS = ("size_mb", "prefill_p50_ms", "prefill_p95_ms", "decode_ms_ctx128", "decode_ms_ctx1024",
           "peak_rss_mb", "accuracy")
BASELINE = "ort-fp32"
CONTEXTS = (128, 1024)
# timings that differ round to round (merge_rounds takes their median; the rest comes from the first
# round that succeeded)
TIMED = ("prefill_p50_ms", "prefill_p95_ms", "decode_ms_ctx0", "decode_ms_ctx128", "decode_ms_ctx1024")
PAIRED = ("prefill_p50_ms", "prefill_p95_ms", "decode_ms_ctx128", "decode_ms_ctx1024")


def merge_rounds(results: list[dict]) -> dict:
    """One variant's results over interleaved rounds -> one row: each timing (``TIMED``) is the median
    over the rounds that measured it, peak RSS the largest, everything else (size, accuracy, notes)
    the first successful round's; ``rounds`` keeps every round's timings in order (None for a round
    that failed, which the medians leave out); when all failed, the first error is the row's."""
    ok = [r for r in results if not r.get("error")]
    if not ok:
        return dict(results[0]) if results else {"error": "not measured"}
    row = dict(ok[0])
    for k in TIMED:
        vals = [r[k] for r in ok if r.get(k) is not None]
        if vals:
            row[k] = median(vals)
    rss = [r["peak_rss_mb"] for r in ok if r.get("peak_rss_mb") is not None]
    if rss:
        row["peak_rss_mb"] = max(rss)
    if len(results) > 1:
        row["rounds"] = [None if r.get("error") else {k: r[k] for k in TIMED if r.get(k) is not None}
                         for r in results]
    return row


def paired_ratios(rows: list[dict], a: str, b: str) -> dict:
    """Per model with both variants measured in the same rounds: for each timing in ``PAIRED``, the
    per-round ratio a / b summarised as median, min and max. Pairing rounds cancels a drift in the
    machine's speed that a ratio of two medians taken minutes apart would carry."""
    out = {}
    by = {(r["model"], r["variant"]): r for r in rows if r.get("rounds")}
    for (model, v), ra in by.items():
        rb = by.get((model, b))
        if v != a or rb is None or len(ra["rounds"]) != len(rb["rounds"]):
            continue
        m = {}
        for k in PAIRED:
            q = [x[k] / y[k] for x, y in zip(ra["rounds"], rb["rounds"]) if x and y and x.get(k) and y.get(k)]
            if q:
                m[k] = {"median": median(q), "min": min(q), "max": max(q), "rounds": len(q)}
        out[model] = m
    return out


def paired_note(pairs: dict, a: str, b: str) -> str:
    """One sentence per model: the per-round ratios ``paired_ratios`` found."""
    parts = []
    for model, m in pairs.items():
        cells = [f"{k.replace('_ms', '').replace('_', ' ')} {v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"
                 for k, v in m.items()]
        if cells:
            n = max(v["rounds"] for v in m.values())
            parts.append(f"{model}: {a} ÷ {b} per round (median [min-max] of {n}): " + ", ".join(cells) + ".")
    return " ".join(parts)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Set row["vs_ort_fp32"][metric] = value / baseline value of the same model (None if missing)."""
    base = {r["model"]: r for r in rows if r["variant"] == BASELINE and not r.get("error")}
    for r in rows:
        b = base.get(r["model"], {})
        r["vs_ort_fp32"] = {m: (r[m] / b[m] if r.get(m) is not None and b.get(m) else None) for m in METRICS}
    return rows


def add_floor(row: dict, ap: ActiveParams, bandwidth_gbs: float, cache_elem_bytes: int) -> dict:
    """Decode floor = (active weights at this artifact's bytes/param + latent cache read) / bandwidth.
    Bytes/param is size_mb / total params: an average over the artifact (embeddings, scales and all)."""
    floor = {"bandwidth_gbs": bandwidth_gbs, "cache_elem_bytes": cache_elem_bytes}
    size = row.get("size_mb")
    if size:
        w = ap.per_token * size * 1e6 / ap.total
        floor["weight_mb_per_token"] = w / 1e6
        for ctx in CONTEXTS:
            f = decode_floor_ms(w, ap.cache_elems_per_token * cache_elem_bytes, ctx, bandwidth_gbs)
            floor[f"floor_ms_ctx{ctx}"] = f
            floor[f"fraction_ctx{ctx}"] = floor_fraction(f, row.get(f"decode_ms_ctx{ctx}"))
    row["floor"] = floor
    return row


def _num(x, digits=1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(r: dict, m: str, digits=1, pct=False) -> str:
    v = r.get(m)
    if v is None:
        return "–"
    s = f"{100 * v:.1f}%" if pct else _num(v, digits)
    ratio = (r.get("vs_ort_fp32") or {}).get(m)
    return s if ratio is None or r["variant"] == BASELINE else f"{s} ({ratio:.2f}×)"


def _decode_cell(r: dict, ctx: int) -> str:
    s = _cell(r, f"decode_ms_ctx{ctx}", 2)
    frac = (r.get("floor") or {}).get(f"fraction_ctx{ctx}")
    if s != "–" and frac is not None:
        s += f" [{100 * frac:.0f}%]"
    return s


def markdown(rows: list[dict], host: dict, threads: int, bandwidth: dict, note: str = "") -> str:
    """The results table; ratios in parentheses are to ort-fp32 of the same model, [x%] is the share
    of the memory-bandwidth floor a decode reached."""
    head = ["model", "variant", "size MB", "prefill p50 ms", "prefill p95 ms", "decode ms ctx128",
            "decode ms ctx1024", "floor ms 128 / 1024", "peak RSS MB", "accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fl = r.get("floor") or {}
        if r.get("error"):
            err = r["error"] if r["error"].startswith("skipped") else f"failed: {r['error'][:100]}"
            cells = [r["model"], r["variant"], err] + [""] * (len(head) - 3)
        else:
            cells = [r["model"], r["variant"], _cell(r, "size_mb"), _cell(r, "prefill_p50_ms"),
                     _cell(r, "prefill_p95_ms"), _decode_cell(r, 128), _decode_cell(r, 1024),
                     f"{_num(fl.get('floor_ms_ctx128'), 2)} / {_num(fl.get('floor_ms_ctx1024'), 2)}",
                     _cell(r, "peak_rss_mb", 0), _cell(r, "accuracy", pct=True)]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    isa = ", ".join(host.get("isa", []))
    lines += ["", f"Machine: {host.get('cpu_model')} ({host.get('arch')}), {host.get('cores')} usable cores, "
              f"ISA {isa}; onnxruntime {host.get('onnxruntime')}; {threads} threads for every row. "
              f"Copy bandwidth {bandwidth['gbs_1t']:.1f} GB/s (1 thread), {bandwidth['gbs']:.1f} GB/s "
              f"({threads} thread{'s' if threads > 1 else ''}; the floor uses this).",
              "(x×) = ratio to ort-fp32 of the same model; [x%] = share of the decode floor reached "
              "(floor = active weight bytes + latent cache bytes read per token ÷ bandwidth)."]
    if note:
        lines.append(note)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # python -m benchmarks.tables RESULTS.json: re-render a results file's markdown table
    import json
    import sys

    doc = json.loads(open(sys.argv[1]).read())
    print(markdown(doc["rows"], doc["host"], doc["threads"], doc["bandwidth"], doc.get("note", "")), end="")
