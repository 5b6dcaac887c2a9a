"""Render ``bench/results/*.json`` into ``REPORT.md`` and PNG plots (matplotlib, Agg).

Run: ``python -m bench.report [DIR]`` (``python -m bench`` calls it after the suite). Reads
whatever section results are present; a section that was skipped or failed says so.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPORT = "REPORT.md"
METHOD_LABELS = {
    "peft_switch": "PEFT LoRA, switching adapters",
    "peft_mixed": "PEFT LoRA, mixed-adapter batch",
    "ours_loop": "ours, tasks one by one (all tokens)",
    "ours_stacked": "ours, stacked (all tokens)",
    "ours_cls": "ours, CLS-only (serving path)",
}
Json = dict[str, Any]
NOT_RUN: Json = {}


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, thousands separated; missing values as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


def _get(d: Any, *path: Any) -> Any:
    """``d[path[0]][path[1]]...`` or None when any step is missing."""
    for key in path:
        if isinstance(d, dict):
            d = d.get(key)
        elif isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d):
            d = d[key]
        else:
            return None
    return d


def _status(d: Json) -> str | None:
    """Why a section has no numbers, or None when it has."""
    if d is NOT_RUN:
        return ""
    if "skipped" in d:
        return f"_not measured: {d['skipped']}_"
    if "error" in d:
        return f"_failed: {d['error']}_"
    return None


def _run_line(d: Json) -> str:
    meta = d.get("suite") or {}
    if d is NOT_RUN:
        return "_Not run yet: `python -m bench` writes it._"
    if not meta:
        return "_Measured outside the suite (its own `__main__`)._"
    clock = f", {meta['clock']} clock, {meta.get('threads')} threads" if "clock" in meta else ""
    cpu = f" ({meta['cpu_seconds']} CPU s)" if "cpu_seconds" in meta else ""
    return (
        f"_Profile {meta.get('profile')}{clock}, {meta.get('date')}, {meta.get('seconds')} s{cpu}._"
    )


# --------------------------------------------------------------------------- fan-out


SHORT_ARCH = {
    "vit_small_patch16_224": "ViT-S/16",
    "vit_base_patch16_224": "ViT-B/16",
    "vit_small_patch14_dinov2": "ViT-S/14 DINOv2",
    "vit_base_patch14_dinov2": "ViT-B/14 DINOv2",
    "vit_test_tiny": "tiny",
}


def short_arch(arch: str) -> str:
    """A preset's display name (ViT-S/16) for plots."""
    return SHORT_ARCH.get(arch, arch)


def _fanout_row(entry: Json, k: int) -> Json | None:
    return next((r for r in entry.get("rows", []) if r.get("K") == k), None)


def _x(row: Json | None, method: str) -> float | None:
    value = _get(row, method, "x_plain")
    return float(value) if value is not None else None


def fanout_section(d: Json, plots: dict[str, str]) -> list[str]:
    """Section 1: cost of K tasks per image, ours vs the PEFT peer."""
    lines = ["## 1. Fan-out: K tasks per image, ours vs the PEFT peer", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    lines += [
        "Cost per batch of images as a multiple of **one plain forward of the same side's "
        "backbone** (each call divided by the mean of the same side's plain forwards timed "
        "just before and after it; median over calls), so load bursts and the two "
        "backbones' own speed cancels out. Peer: transformers "
        f"{_get(d, 'versions', 'transformers')} `ViTForImageClassification` + PEFT "
        f"{_get(d, 'versions', 'peft')} LoRA r = 8 on query/value with a classifier per task "
        "(`modules_to_save`), random weights. Ours: res_adapter r = 8 on every block; "
        "'one by one' and 'stacked' run mean-pooled (all-token) tasks, 'CLS-only' runs "
        "CLS-pooled tasks on CLS rows only (the serving path). 'vs PEFT' = the peer's "
        "multiple / ours (CLS-only); 'ideal' = K(Tb+Tt)/(Tb+K Tt) with Tb one plain forward "
        "and Tt one CLS task's fan-out; 'vs copies' = our speed-up over K copies of our own "
        "one-task path (compare with 'ideal'; it can exceed it, within noise, because the "
        "CLS-only capture is cheaper than a plain forward: its last block runs for the CLS "
        "row alone). Paper: 5.2x at 19 VTAB tasks, 6.1x at 10 generative tasks.",
        "",
    ]
    for entry in d.get("archs", []):
        arch = entry["arch"]
        lines += [
            f"### {arch}, batch {entry['batch']}, rounds: {entry['rounds']}",
            "",
            f"One plain forward: peer {fmt(_get(entry, 'plain_forward_ms', 'peft'))} ms "
            f"({fmt(_get(entry, 'plain_images_per_s', 'peft'))} img/s), ours "
            f"{fmt(_get(entry, 'plain_forward_ms', 'ours'))} ms "
            f"({fmt(_get(entry, 'plain_images_per_s', 'ours'))} img/s); Tt = "
            f"{fmt(entry.get('Tt_ms'), 3)} ms. PEFT mixed batch: "
            f"{_get(entry, 'peer', 'mixed_batch')}.",
            "",
        ]
        rows = []
        for r in entry.get("rows", []):
            rows.append(
                [
                    r["K"],
                    *(_x(r, m) for m in METHOD_LABELS),
                    r.get("ratio_vs_peft_switch"),
                    r.get("ratio_vs_peft_mixed"),
                    r.get("paper_ratio"),
                    r.get("speedup_vs_separate_copies"),
                    r.get("ideal_speedup"),
                    _get(r, "ours_cls", "task_predictions_per_s"),
                    _get(r, "peft_switch", "task_predictions_per_s"),
                ]
            )
        lines += table(
            [
                "K",
                "PEFT switch x",
                "PEFT mixed x",
                "ours 1-by-1 x",
                "ours stacked x",
                "ours CLS x",
                "vs PEFT switch",
                "vs PEFT mixed",
                "paper",
                "vs copies",
                "ideal",
                "ours preds/s",
                "PEFT preds/s",
            ],
            rows,
        )
        if arch in plots:
            lines += ["", f"![fan-out cost vs K, {arch}]({plots[arch]})"]
        lines.append("")
    return lines


def plot_fanout(d: Json, out: Path) -> dict[str, str]:
    """One log-log plot per backbone: cost in plain forwards vs K, every method."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    written = {}
    for entry in d.get("archs", []):
        rows = entry.get("rows", [])
        ks = [r["K"] for r in rows]
        if not ks:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method, label in METHOD_LABELS.items():
            points = [(r["K"], _x(r, method)) for r in rows if _x(r, method) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        tb, tt = entry.get("Tb_ms"), entry.get("Tt_ms")
        ax.plot(ks, ks, "k--", lw=1, label="K plain forwards")
        if tb and tt is not None:
            ax.plot(ks, [1 + k * tt / tb for k in ks], "k:", lw=1, label="1 forward + K x Tt")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel(f"tasks per image (K), batch {entry['batch']}")
        ax.set_ylabel("cost / one plain forward of the same side")
        ax.set_title(f"Serving K tasks per image: {short_arch(entry['arch'])}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        name = f"fanout_{entry['arch']}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written[entry["arch"]] = name
    return written


def fanout_headline(d: Json) -> list[str]:
    """Headline bullets: K = 19 and 64 on the first (ViT-S) backbone."""
    entry = _get(d, "archs", 0)
    if not entry:
        return []
    out = []
    goal = d.get("goal_x_plain_at_19")
    for k in (19, 64):
        r = _fanout_row(entry, k)
        if r is None:
            continue
        ours = _x(r, "ours_cls")
        peer = _x(r, "peft_switch")
        goal_note = f" (goal <= {goal}x)" if k == 19 and goal else ""
        paper = f"; paper: {r['paper_ratio']}x" if r.get("paper_ratio") else ""
        mixed = (
            f", {fmt(r.get('ratio_vs_peft_mixed'), 1)}x vs its mixed-adapter batch"
            if r.get("ratio_vs_peft_mixed")
            else ""
        )
        out.append(
            f"- **K = {k}** tasks per image ({entry['arch']}, batch {entry['batch']}): ours "
            f"costs **{fmt(ours)}x** one plain forward{goal_note}, PEFT LoRA switching "
            f"{fmt(peer, 1)}x: **{fmt(r.get('ratio_vs_peft_switch'), 1)}x** the peer's "
            f"throughput{mixed}{paper}; speed-up over K copies of our one-task path "
            f"{fmt(r.get('speedup_vs_separate_copies'), 1)}x of an ideal "
            f"{fmt(r.get('ideal_speedup'), 1)}x."
        )
    return out


# --------------------------------------------------------------------------- server


def server_section(d: Json, plots: dict[str, str]) -> list[str]:
    """Section 2: the server over HTTP under load, next to the engine alone."""
    lines = ["## 2. Server end to end", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    lines += [
        f"A real `restune serve` ({d.get('arch')}, random weights, feature cache "
        f"{d.get('feature_cache', 'off')}) and a separate load-generator process (async "
        f"httpx, {d.get('concurrency')} requests in flight of {d.get('images_per_request')} "
        f"JPEGs each); engine alone = the same batches through `Engine.run_batch`, measured "
        "in the same run. Server overhead = 1 - server images/s / engine-alone images/s; "
        "engine busy = share of the measured window the server's engine computed (from its "
        "/metrics), so 1 - busy bounds what HTTP, decoding and batching cost even on a busy "
        "machine.",
        "",
    ]
    rows = []
    for r in d.get("rows", []):
        eff = r.get("http_efficiency")
        rows.append(
            [
                r.get("tasks_per_image"),
                r.get("images_per_s"),
                r.get("answers_per_s"),
                r.get("p50_ms"),
                r.get("p95_ms"),
                r.get("p99_ms"),
                _get(r, "server", "mean_batch_images"),
                _pct(_get(r, "server", "engine_busy")),
                r.get("engine_images_per_s"),
                _pct(1 - eff if isinstance(eff, int | float) else None),
                sum((r.get("errors") or {}).values()),
            ]
        )
    lines += table(
        [
            "tasks/image",
            "images/s",
            "answers/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "mean batch",
            "engine busy",
            "engine alone images/s",
            "server overhead",
            "errors",
        ],
        rows,
    )
    if "server" in plots:
        lines += ["", f"![server latency percentiles]({plots['server']})"]
    return [*lines, ""]


def plot_server(d: Json, out: Path) -> dict[str, str]:
    """Grouped bars: p50/p95/p99 latency per tasks-per-image."""
    import matplotlib.pyplot as plt

    rows = [r for r in d.get("rows", []) if r.get("p50_ms") is not None]
    if not rows:
        return {}
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.25
    for i, q in enumerate(("p50_ms", "p95_ms", "p99_ms")):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [r[q] for r in rows], width, label=q.split("_")[0])
    ax.set_xticks(range(len(rows)), [f"K = {r['tasks_per_image']}" for r in rows])
    ax.set_ylabel("request latency, ms")
    ax.set_title("restune serve under concurrent load")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "server_latency.png", dpi=90)
    plt.close(fig)
    return {"server": "server_latency.png"}


def _pct(value: Any) -> str | None:
    return f"{100 * value:.0f}%" if isinstance(value, int | float) else None


def server_headline(d: Json) -> list[str]:
    """Headline bullet: server overhead at the largest K."""
    rows = [r for r in d.get("rows", []) if r.get("http_efficiency") is not None]
    if not rows:
        return []
    parts = [
        f"K = {r['tasks_per_image']}: engine busy {_pct(_get(r, 'server', 'engine_busy'))}, "
        f"{_pct(r['http_efficiency'])} of the engine-alone rate, p50/p99 "
        f"{fmt(r.get('p50_ms'), 0)}/{fmt(r.get('p99_ms'), 0)} ms"
        for r in rows
    ]
    return [
        "- **Server** under concurrent load (separate load-generator process on the same "
        "cores): the engine computes for this share of the measured window, the rest is "
        f"HTTP, decoding and batching: {'; '.join(parts)}."
    ]


# --------------------------------------------------------------------------- runtimes


def runtimes_section(d: Json, plots: dict[str, str]) -> list[str]:
    """Section 3: torch vs ONNX Runtime fp32 vs int8, and the share of the matmul peak."""
    lines = ["## 3. Backbone runtimes", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    peak = d.get("matmul_peak_gflops") or {}
    lines += [
        "The serving path (CLS rows of every layer) under each runtime, random weights, "
        f"interleaved rounds. fp32 matmul peak measured in the same run: "
        f"{fmt(peak.get('before'), 1)} GFLOP/s before, {fmt(peak.get('after'), 1)} after "
        f"(torch, {d.get('threads')} threads, {peak.get('size')}^2 matrices); the int8 rows "
        "count the same FLOPs. AVX-512 VNNI: "
        f"{fmt(d.get('avx512_vnni'))}.",
        "",
    ]
    rows = [
        [
            r.get("arch"),
            r.get("batch"),
            r.get("runtime"),
            r.get("ms_per_batch"),
            r.get("img_per_s"),
            r.get("fraction_of_matmul_peak"),
            r.get("speedup_vs_torch"),
        ]
        for r in d.get("throughput", [])
    ]
    lines += table(
        ["arch", "batch", "runtime", "ms/batch", "images/s", "share of fp32 peak", "vs torch"],
        rows,
    )
    parity = [
        [
            p.get("arch"),
            _get(p, "onnx_fp32", "rel"),
            _get(p, "onnx_int8", "rel"),
            _get(p, "onnx_int8", "mean_cosine"),
        ]
        for p in d.get("parity", [])
    ]
    if parity:
        lines += [
            "",
            *table(["parity vs torch", "fp32 max rel", "int8 max rel", "int8 mean cosine"], parity),
        ]
    acc = d.get("int8_accuracy")
    if acc:
        lines += [
            "",
            f"int8 as the default: **{fmt(d.get('int8_default'))}** ({d.get('int8_rule')}; "
            f"accuracy check: {_scalars(acc)}).",
        ]
    else:
        lines += ["", "int8 accuracy: not checked in this profile (`make bench-full` does)."]
    if "runtimes" in plots:
        lines += ["", f"![runtimes as a fraction of the fp32 matmul peak]({plots['runtimes']})"]
    return [*lines, ""]


def _scalars(d: Any) -> str:
    if not isinstance(d, dict):
        return fmt(d)
    return ", ".join(f"{k} {fmt(v)}" for k, v in d.items() if not isinstance(v, dict | list))


def plot_runtimes(d: Json, out: Path) -> dict[str, str]:
    """Bars: each runtime's images/s as a fraction of the measured fp32 matmul peak."""
    import matplotlib.pyplot as plt

    rows = [r for r in d.get("throughput", []) if r.get("fraction_of_matmul_peak") is not None]
    if not rows:
        return {}
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.3 * len(rows)))
    labels = [f"{short_arch(r['arch'])} b{r['batch']} {r['runtime']}" for r in rows]
    ax.barh(labels, [r["fraction_of_matmul_peak"] for r in rows])
    ax.axvline(1.0, color="k", lw=1, ls="--")
    ax.invert_yaxis()
    ax.set_xlabel("images/s x FLOPs per image / fp32 matmul peak")
    ax.set_title("Runtimes vs the fp32 matmul peak (same run)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "runtimes_peak.png", dpi=90)
    plt.close(fig)
    return {"runtimes": "runtimes_peak.png"}


# --------------------------------------------------------------------------- registry, cache


def registry_section(d: Json) -> list[str]:
    """Section 4: the registry at 1,000 tuners."""
    lines = ["## 4. Registry at scale", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    tuner = d.get("tuner", {})
    lines += [
        f"{d.get('tuners')} tuners registered one by one on {d.get('arch')} (random "
        f"weights): {tuner.get('kind')} r = {tuner.get('bottleneck')} on blocks "
        f"{tuner.get('layers')}, {tuner.get('classes')} classes, CLS pooling. In one process "
        "with the server's `InferenceService`: register, then predict until the new version "
        "answers. Predict latency: that service (all registered and loaded) and a second one "
        f"in the same process holding {d.get('few')} of them, calls alternating between the "
        "two (one task; 'cached' = a repeated image, a feature-cache hit; 'forward' = a new "
        "image each time).",
        "",
    ]
    rows = []
    for store in ("file", "redis"):
        s = d.get(store) or {}
        if "skipped" in s or not s:
            rows.append([store, s.get("skipped", "-")])
            continue
        rows.append(
            [
                store,
                s.get("registered"),
                _get(s, "register_to_servable", "p50_ms"),
                _get(s, "register_to_servable", "p99_ms"),
                _get(s, "predict_few", "cache_hit", "p50_ms"),
                _get(s, "predict_many", "cache_hit", "p50_ms"),
                _get(s, "predict_few", "forward", "p50_ms"),
                _get(s, "predict_many", "forward", "p50_ms"),
                _kib(s.get("rss_bytes_per_tuner")),
                _kib(s.get("tensor_bytes_per_tuner")),
                _kib(s.get("artifact_bytes")),
            ]
        )
    few, many = d.get("few"), d.get("tuners")
    lines += table(
        [
            "store",
            "tuners",
            "register->servable p50 ms",
            "p99 ms",
            f"predict cached p50 ms ({few})",
            f"({many})",
            f"predict forward p50 ms ({few})",
            f"({many})",
            "RSS KiB / loaded tuner",
            "tensor KiB / tuner",
            "artifact KiB",
        ],
        rows,
    )
    rep = d.get("replicas") or {}
    if "skipped" in rep:
        lines += ["", f"Two replicas: _not measured: {rep['skipped']}_"]
    elif rep:
        lines += [
            "",
            f"Two `restune serve` replicas on one Redis ({rep.get('registered_on_b')} tuners "
            "registered): `PUT` on A over HTTP, then predict on B over HTTP until B answers "
            "with it.",
            "",
            *table(
                ["on replica B", "n", "p50 ms", "p95 ms", "p99 ms"],
                [
                    [label, _get(rep, key, "n"), *(_get(rep, key, f"p{q}_ms") for q in PCTS)]
                    for key, label in (
                        ("new_name", "a new tuner"),
                        ("new_version", "a new version"),
                    )
                ],
            ),
        ]
    return [*lines, ""]


PCTS = (50, 95, 99)
REPLICA_ROWS = (("new_name", "a new tuner"), ("new_version", "a new version"))


def _kib(value: Any) -> float | None:
    return round(value / 1024, 1) if isinstance(value, int | float) else None


def registry_headline(d: Json) -> list[str]:
    """Headline bullet: memory per tuner, registration latency, predict flat in size."""
    s = d.get("file") or {}
    if not s or "skipped" in s:
        return []
    rep = d.get("replicas") or {}
    replica = (
        f"; across two replicas on one Redis a new version serves on the other replica in "
        f"p50 {fmt(_get(rep, 'new_version', 'p50_ms'), 0)} ms / p99 "
        f"{fmt(_get(rep, 'new_version', 'p99_ms'), 0)} ms"
        if "new_version" in rep
        else ""
    )
    rss = fmt(_kib(s.get("rss_bytes_per_tuner")), 0)
    tensors = fmt(_kib(s.get("tensor_bytes_per_tuner")), 0)
    reg = s.get("register_to_servable") or {}
    return [
        f"- **Registry**: {s.get('registered')} tuners, {rss} KiB resident per loaded tuner "
        f"({tensors} KiB of tensors); register-to-servable p50 {fmt(reg.get('p50_ms'), 0)} ms"
        f" / p99 {fmt(reg.get('p99_ms'), 0)} ms (file store)"
        f"{replica}; predict p50 with {d.get('few')} vs {d.get('tuners')} registered: "
        f"{fmt(_get(s, 'predict_few', 'cache_hit', 'p50_ms'))} vs "
        f"{fmt(_get(s, 'predict_many', 'cache_hit', 'p50_ms'))} ms (cached features)."
    ]


def cache_section(d: Json) -> list[str]:
    """Section 5: feature cache hit vs miss."""
    lines = ["## 5. Feature cache", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    lines += [
        f"{d.get('images')} images ({d.get('image')}) on {d.get('arch')}, each asked first for "
        f"{d.get('tasks_per_request')} tasks (a miss: one forward) and then for "
        f"{d.get('tasks_per_request')} new tasks (a hit: no forward). Service-level predict "
        f"latency, decode included. Hits/misses not as expected: "
        f"{d.get('unexpected_hit_or_miss')}.",
        "",
        *table(
            ["", "n", "mean ms", "p50 ms", "p95 ms", "p99 ms"],
            [
                [label, _get(d, key, "n"), _get(d, key, "mean_ms")]
                + [_get(d, key, f"p{q}_ms") for q in PCTS]
                for key, label in (
                    ("miss", "miss (new image)"),
                    ("hit", "hit (repeat image, new tasks)"),
                    ("miss_backbone", "backbone share of a miss"),
                )
            ],
        ),
        "",
        f"A hit answers {fmt(d.get('hit_speedup_p50'), 1)}x faster at the median.",
        "",
    ]
    return lines


def cache_headline(d: Json) -> list[str]:
    """Headline bullet: hit vs miss."""
    if _status(d) is not None or "hit" not in d:
        return []
    return [
        f"- **Feature cache**: a repeat image with new tasks answers in p50 "
        f"{fmt(_get(d, 'hit', 'p50_ms'), 1)} ms vs {fmt(_get(d, 'miss', 'p50_ms'), 1)} ms for "
        f"a new image ({fmt(d.get('hit_speedup_p50'), 1)}x)."
    ]


# --------------------------------------------------------------------------- the others


def store_section(d: Json) -> list[str]:
    """Tuner store put/get latency."""
    lines = ["### Tuner store latency", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    rows = [["validate", d.get("validate_ms"), None]]
    for store in ("file", "redis"):
        s = d.get(store) or {}
        rows.append([store, s.get("put_ms"), s.get("get_ms")] if "put_ms" in s else [store])
    return [
        *lines,
        f"{d.get('config')}, {_kib(d.get('artifact_bytes'))} KiB; medians.",
        "",
        *table(["", "put ms", "get ms"], rows),
        "",
    ]


def training_section(d: Json) -> list[str]:
    """Training memory of the bypass vs tuners inside the backbone."""
    lines = ["### Training memory", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    rows = []
    for model in d.get("models", []):
        for name, v in model.get("variants", {}).items():
            rows.append(
                [
                    model.get("arch"),
                    model.get("batch"),
                    name,
                    v.get("peak_bytes", 0) / 2**20,
                    v.get("peak_change_pct"),
                    v.get("step_s", 0) * 1000,
                ]
            )
    return [
        *lines,
        f"Paper: {d.get('paper_peak_change_pct')}% training memory for the bypass.",
        "",
        *table(["arch", "batch", "variant", "peak MiB", "vs inside %", "step ms"], rows),
        "",
    ]


def training_scale_section(d: Json) -> list[str]:
    """Peak RSS, time and cache bytes of `restune train` at two dataset sizes."""
    lines = ["### Training at dataset scale", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    rows = [
        [
            r["pooling"],
            r["images"],
            r["phase"],
            r["peak_rss_mb"],
            r["wall_s"],
            r["cpu_s"],
            r["cache_bytes_per_image"] / 1e3,
        ]
        for r in d.get("runs", [])
    ]
    growth = "; ".join(
        f"{pooling} " + ", ".join(f"{phase} x{ratio}" for phase, ratio in phases.items())
        for pooling, phases in d.get("rss_growth", {}).items()
    )
    return [
        *lines,
        f"`restune train` child processes on {d.get('backbone')}, {d.get('epochs')} epochs; "
        "cold = empty feature cache, warm = the same command again. Peak RSS at the larger "
        f"size over the smaller: {growth}.",
        "",
        *table(
            ["pooling", "images", "cache", "peak RSS MB", "wall s", "CPU s", "cache KB/image"],
            rows,
        ),
        "",
    ]


def fanout_cost_section(d: Json) -> list[str]:
    """Our fan-out alone: loop vs stacked, CLS rows vs all tokens."""
    lines = ["### Fan-out cost, loop vs stacked (our engine alone)", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    rows = [
        [r["batch"], r["K"], r.get("loop_x"), r.get("stacked_x"), r.get("capture_plus_stacked_x")]
        for r in d.get("fanout_cls", [])
    ]
    return [
        *lines,
        f"{d.get('arch')}, res_adapter r = {_get(d, 'tuner', 'r')}, CLS tasks; x = multiple of "
        "one plain forward.",
        "",
        *table(["batch", "K", "loop x", "stacked x", "capture + stacked x"], rows),
        "",
    ]


def fanout_heads_section(d: Json) -> list[str]:
    """19 VTAB-1k heads beside 19 alike heads: per-shape groups vs one stack."""
    lines = ["### Fan-out of mixed heads: 19 VTAB-1k class counts", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    rows = [
        [
            r.get("batch"),
            r.get("alike_ms"),
            r.get("vtab_per_shape_groups_ms"),
            r.get("vtab_padded_ms"),
            r.get("vtab_segmented_ms"),
            r.get("vtab_chosen_layout"),
        ]
        for r in d.get("fanout_heads", [])
    ]
    headers = [
        "batch",
        "19 alike heads ms",
        "VTAB, one group per shape ms",
        "VTAB, one stack, padded ms",
        "segmented ms",
        "chosen",
    ]
    return [
        *lines,
        f"{d.get('arch')}, res_adapter r = {_get(d, 'tuner', 'r')}, CLS tasks, every task on "
        f"every row; {d.get('clock')} clock, {d.get('threads')} threads.",
        "",
        *table(headers, rows),
        "",
    ]


def backbone_section(d: Json) -> list[str]:
    """Eager backbone throughput: full forward vs the CLS capture of every layer."""
    lines = ["### Backbone, eager torch", "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    rows = [
        [
            r.get("arch"),
            r.get("batch"),
            _get(r, "full", "ms_per_batch"),
            _get(r, "full", "img_per_s"),
            _get(r, "capture_cls", "ms_per_batch"),
            r.get("capture_cls_over_full"),
            _get(r, "cpu_time_1thread_ms", "full"),
            _get(r, "cpu_time_1thread_ms", "capture_cls"),
        ]
        for r in d.get("results", [])
    ]
    headers = [
        "arch",
        "batch",
        "full ms",
        "full img/s",
        "CLS capture ms",
        "capture / full",
        "1-thread CPU ms, full",
        "capture",
    ]
    return [*lines, *table(headers, rows), ""]


OTHERS: dict[str, Callable[[Json], list[str]]] = {
    "fanout_cost": fanout_cost_section,
    "fanout_heads": fanout_heads_section,
    "backbone_eager": backbone_section,
    "store_latency": store_section,
    "training_memory": training_section,
    "training_scale": training_scale_section,
}


# --------------------------------------------------------------------------- the report


def _machine(suite: Json) -> list[str]:
    m = suite.get("machine") or {}
    if not m:
        return []
    versions = m.get("versions") or {}
    libs = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    return [
        f"Machine: {m.get('cpu')}, {m.get('cpus_usable') or m.get('cpu_count')} cores usable, "
        f"{m.get('memory_gib')} GiB, {m.get('platform')}, Python {m.get('python')}; torch "
        f"threads {m.get('torch_threads')}; load average at start {m.get('load_avg_1m')}. "
        f"Libraries: {libs}. Run started {m.get('date')}.",
    ]


def reproduce_command(suite: Json) -> str:
    """The command line that produced ``suite.json``'s run."""
    parts = ["python -m bench"]
    profile = suite.get("profile", "quick")
    if profile != "quick":
        parts.append(f"--{profile}")
    if suite.get("clock", "wall") != "wall":
        parts.append(f"--clock {suite['clock']}")
    if suite.get("threads", 2) != 2:
        parts.append(f"--threads {suite['threads']}")
    return " ".join(parts)


def _clock(suite: Json) -> list[str]:
    if suite.get("clock") == "cpu":
        return [
            f"The fan-out comparison (section 1) uses **CPU time** of the measuring process "
            f"with {suite.get('threads')} torch thread(s), as do the registry and feature-cache "
            "sections' threads: the machine was shared with other jobs, and CPU time is what "
            "they barely disturb (on a dedicated machine it equals wall time at 1 thread). "
            "Service latencies are wall time; the other sections keep their own clock and "
            "threads (stated in each).",
            "",
        ]
    if suite.get("clock") == "wall":
        return [
            f"Wall-clock timings; the fan-out, registry and feature-cache sections run "
            f"{suite.get('threads')} torch threads.",
            "",
        ]
    return []


def _plots(data: dict[str, Json], out: Path) -> tuple[dict[str, str], str | None]:
    """Write every plot; returns names by key, and why none were drawn (if so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return {}, "matplotlib is not installed (pip install -e '.[bench]'): no plots"
    plots: dict[str, str] = {}
    drawers: tuple[tuple[str, Callable[[Json, Path], dict[str, str]]], ...] = (
        ("peft_peer", plot_fanout),
        ("server_throughput", plot_server),
        ("runtimes", plot_runtimes),
    )
    for name, draw in drawers:
        d = data.get(name)
        if d and _status(d) is None:
            plots.update(draw(d, out))
    return plots, None


def render(results: Path = RESULTS) -> Path:
    """Write ``REPORT.md`` and the PNGs into ``results`` from the JSON there; its path."""
    data: dict[str, Json] = {
        p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))
    }
    suite = data.pop("suite", {})
    plots, no_plots = _plots(data, results)
    lines = [
        "# restune benchmarks",
        "",
        f"Reproduce: `{reproduce_command(suite)}` (`make bench` runs the quick profile, "
        "`make bench-full` the full one). Timings on a "
        "shared machine swing by tens of percent between runs, so every comparison below is "
        "measured side by side within one run: compare ratios, not absolute times across "
        "runs. Random backbone weights throughout (speed does not depend on them), except "
        "the accuracy section (real weights).",
        "",
        *_machine(suite),
        "",
        *_clock(suite),
    ]
    if no_plots:
        lines += [f"_{no_plots}_", ""]
    from bench.efficacy_report import efficacy_headline, efficacy_section

    headline = [
        *fanout_headline(data.get("peft_peer", {})),
        *server_headline(data.get("server_throughput", {})),
        *registry_headline(data.get("registry_scale", {})),
        *cache_headline(data.get("feature_cache", {})),
        *efficacy_headline(data.get("efficacy", {})),
    ]
    if headline:
        lines += ["## Headline", "", *headline, ""]
    missing = NOT_RUN
    lines += fanout_section(data.get("peft_peer", missing), plots)
    lines += server_section(data.get("server_throughput", missing), plots)
    lines += runtimes_section(data.get("runtimes", missing), plots)
    lines += registry_section(data.get("registry_scale", missing))
    lines += cache_section(data.get("feature_cache", missing))
    lines += efficacy_section(data.get("efficacy", missing))
    others = [name for name in OTHERS if name in data]
    if others:
        lines += ["## Other measurements", ""]
        for name in others:
            lines += OTHERS[name](data[name])
    path = results / REPORT
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def main() -> None:
    """CLI: render the report of a results folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(render(args.results))


if __name__ == "__main__":
    main()
