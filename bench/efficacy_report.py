"""The accuracy section of ``REPORT.md`` (``bench/efficacy.py``'s results), kept apart from the
heavy bench module so that rendering needs no torch."""

from __future__ import annotations

from typing import Any

from bench.report import _run_line, _status, fmt, short_arch, table

Json = dict[str, Any]

TITLE = "## 6. Accuracy: bypass vs linear probe on the same frozen backbone"


def _cell(scores: Json | None) -> str:
    """Test accuracy in percent, with the spread over seeds when there are several."""
    if not scores:
        return "-"
    acc = scores["test_accuracy"]
    text = f"{100 * acc['mean']:.1f}"
    if acc.get("n", 1) > 1:
        text += f" ± {100 * acc['std']:.1f}"
    return text


def _kinds(d: Json) -> dict[str, str]:
    return {m["name"]: m["kind"] for m in d.get("methods", [])}


def _picked(task: Json, kinds: dict[str, str], kind: str) -> str | None:
    """The method of ``kind`` with the best validation accuracy (what ``--search`` keeps)."""
    scored = [
        (m["val_accuracy"]["mean"], name)
        for name, m in task["methods"].items()
        if kinds.get(name) == kind
    ]
    return max(scored)[1] if scored else None


def selection_margins(d: Json, default: str = "adapter-cls-top6") -> Json:
    """Test-accuracy margins over the linear probe that need no look at the test set: the
    bypass and the probe each picked on validation, and the default bypass against
    ``probe-cls``. (The table's last column picks the best of each by test accuracy.)"""
    kinds = _kinds(d)
    picked: list[float] = []
    fixed: list[float] = []
    for task in d.get("tasks", []):
        methods = task["methods"]
        bypass, probe = _picked(task, kinds, "bypass"), _picked(task, kinds, "probe")
        if bypass and probe:
            picked.append(
                methods[bypass]["test_accuracy"]["mean"] - methods[probe]["test_accuracy"]["mean"]
            )
        if default in methods and "probe-cls" in methods:
            fixed.append(
                methods[default]["test_accuracy"]["mean"]
                - methods["probe-cls"]["test_accuracy"]["mean"]
            )
    return {
        "val_picked": picked,
        "val_picked_wins": sum(1 for m in picked if m > 1e-6),
        "default": default,
        "default_vs_probe_cls": fixed,
        "default_wins": sum(1 for m in fixed if m > 1e-6),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def efficacy_section(d: Json) -> list[str]:
    """Per task and method: test accuracy; per method: serving cost at K = 19, train time."""
    lines = [TITLE, "", _run_line(d), ""]
    if (why := _status(d)) is not None:
        return [*lines, why, ""]
    methods = [m["name"] for m in d.get("methods", [])]
    serving = d.get("serving") or {}
    seeds = d.get("seeds") or []
    lines += [
        f"{short_arch(str(d.get('arch')))} with its **real weights** ({d.get('weights')}), "
        f"{d.get('input_side')} px input; {d.get('train_size')} training images per task "
        f"({int(100 * float(d.get('val_fraction', 0)))}% of them held out to pick the epoch / "
        f"the probe's L2 strength), {d.get('test_size')} test images; seeds {seeds}"
        f"{' (mean ± std)' if len(seeds) > 1 else ''}. Bypasses: r = {d.get('bottleneck')}, "
        f"batch {d.get('batch_size')}, up to {d.get('epochs')} epochs with patience "
        f"{d.get('patience')}; inner adapters {d.get('inner_epochs')} epochs. Test accuracy, %:",
        "",
    ]
    rows = []
    for task in d.get("tasks", []):
        margin = task.get("bypass_minus_probe")
        rows.append(
            [
                f"{task['task']} ({task['family']}, {task['classes']} cl.)",
                f"{100 * task['chance']:.1f}",
                *(_cell(task["methods"].get(name)) for name in methods),
                f"{100 * margin:+.1f}" if margin is not None else "-",
            ]
        )
    means = (d.get("summary") or {}).get("mean_accuracy") or {}
    rows.append(
        [
            "**mean over tasks run**",
            "",
            *(f"{100 * means[n]:.1f}" if n in means else "-" for n in methods),
            f"{100 * (d.get('summary') or {}).get('mean_margin', 0.0):+.1f}",
        ]
    )
    x_plain = serving.get("x_plain") or {}
    rows.append(
        [
            f"**serving cost, K={serving.get('K')}** (x one forward)",
            "",
            *(f"{x_plain[n]:.2f}x" if n in x_plain else "-" for n in methods),
            "",
        ]
    )
    seconds = {
        name: [
            t["methods"][name]["train_seconds"] for t in d.get("tasks", []) if name in t["methods"]
        ]
        for name in methods
    }
    rows.append(
        [
            "**train s per task** (mean)",
            "",
            *(fmt(sum(v) / len(v), 1) if v else "-" for v in seconds.values()),
            "",
        ]
    )
    lines += table(["task", "chance", *methods, "best bypass - best probe"], rows)
    summary = d.get("summary") or {}
    lines += [
        "",
        f"The best bypass beats the best linear probe on **{summary.get('bypass_wins')} of "
        f"{summary.get('tasks')} tasks**, by {100 * summary.get('mean_margin', 0.0):+.1f} "
        "points on average (last column: per task, in points). Serving cost: capture + the "
        f"stacked fan-out of {serving.get('K')} tasks at batch {serving.get('batch')} on this "
        f"backbone and input size, as a multiple of one plain forward "
        f"({fmt(serving.get('forward_ms'), 1)} ms); CLS-only methods read one row per layer, "
        "the all-token ones (`adapter-mean`, `probe-cls+mean`) every patch token, and "
        f"`inner-adapter` needs its own backbone forward per task ({serving.get('K')} "
        "forwards). `prefix-paper-cls` runs as a loop of modules (the server's stacked fan-out "
        "has no kernel for it).",
        "",
    ]
    sel = selection_margins(d)
    picked, fixed = sel["val_picked"], sel["default_vs_probe_cls"]
    if picked:
        lines += [
            "Without looking at the test set (the last column picks by test accuracy, which "
            f"flatters the side with more variants): the bypass picked on validation (what "
            f"`restune train --search` does) beats the probe picked on validation on "
            f"**{sel['val_picked_wins']} of {len(picked)}** tasks, "
            f"{100 * _mean(picked):+.1f} points on average "
            f"({', '.join(f'{100 * m:+.1f}' for m in picked)}); the default `{sel['default']}` "
            f"against `probe-cls`: {sel['default_wins']} of {len(fixed)}, "
            f"{100 * _mean(fixed):+.1f} points on average.",
            "",
        ]
    return lines


def efficacy_headline(d: Json) -> list[str]:
    """Headline bullet: how often the bypass beats a linear probe."""
    summary = d.get("summary")
    if _status(d) is not None or not summary:
        return []
    return [
        f"- **Accuracy** (real DINOv2 weights, {summary.get('tasks')} tasks): the best bypass "
        f"beats the best linear probe on {summary.get('bypass_wins')} of "
        f"{summary.get('tasks')} tasks, {100 * summary.get('mean_margin', 0.0):+.1f} points "
        "on average."
    ]
