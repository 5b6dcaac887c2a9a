"""The benchmark suite: which sections run in which profile, and running them.

A section is a module ``bench/<name>.py`` with ``run(quick: bool) -> dict``. Each section runs
in this one process, one after another; every comparison a section makes is measured inside
that section, side by side. Each result lands in ``<out>/<name>.json`` with a ``suite`` entry
(profile, date, seconds, status); ``<out>/suite.json`` records the run and the machine.
"""

from __future__ import annotations

import gc
import importlib
import json
import resource
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

from bench import timing
from bench.machine import machine_info

ProfileName = Literal["smoke", "quick", "full"]
RUNTIMES_QUICK = ("vit_small_patch16_224",)


@dataclass(frozen=True)
class Section:
    """One benchmark module and the profiles it is part of."""

    name: str
    title: str
    profiles: frozenset[ProfileName]
    kwargs: dict[ProfileName, dict[str, Any]] = field(default_factory=dict)
    """Extra arguments of ``run`` per profile (smoke: the tiny backbone)."""


_QUICK: frozenset[ProfileName] = frozenset({"quick", "full"})
_FULL: frozenset[ProfileName] = frozenset({"full"})
_ALL: frozenset[ProfileName] = frozenset({"smoke", "quick", "full"})

_SMOKE: dict[ProfileName, dict[str, Any]] = {"smoke": {"smoke": True}}

SECTIONS: tuple[Section, ...] = (
    Section("peft_peer", "Fan-out vs PEFT LoRA", _ALL, _SMOKE),
    Section("server_throughput", "Server end to end", _QUICK),
    # The runtimes bench's own quick mode is a tiny-backbone smoke run (and 512^2 matmuls, too
    # small for a peak); the suite's quick profile runs its full measurement on ViT-S/16 only,
    # without the int8 accuracy check (that trains the demo tasks: full profile).
    Section(
        "runtimes",
        "Backbone runtimes",
        _QUICK,
        {"quick": {"quick": False, "archs": RUNTIMES_QUICK, "accuracy": False}},
    ),
    Section("registry_scale", "Registry at 1,000 tuners", _ALL, _SMOKE),
    Section("feature_cache", "Feature cache hit vs miss", _ALL, _SMOKE),
    Section("ingest", "Image ingest CPU and memory", _ALL, _SMOKE),
    Section("store_latency", "Tuner store latency", _QUICK),
    Section("efficacy", "Accuracy: bypass vs linear probe", _ALL, _SMOKE),
    # Its quick mode is the tiny test backbone: numbers only a full run should publish.
    Section("training_memory", "Training memory", _FULL),
    # Child `restune train` runs at two dataset sizes: vit_tiny (random) in quick, the embedded
    # DINOv2 at 400 and 4,000 images in full (hours of CPU on 2 cores).
    Section("training_scale", "Training at dataset scale", _QUICK),
    Section("fanout_cost", "Fan-out cost, loop vs stacked", _FULL),
    Section("backbone_eager", "Backbone eager throughput", _FULL),
)
BY_NAME = {s.name: s for s in SECTIONS}


def select(profile: ProfileName, only: list[str] | None) -> list[Section]:
    """The sections to run: ``only`` (any profile) or those of ``profile``, in suite order."""
    if only:
        unknown = sorted(set(only) - BY_NAME.keys())
        if unknown:
            raise ValueError(f"unknown sections {unknown}; known: {sorted(BY_NAME)}")
        return [s for s in SECTIONS if s.name in only]
    return [s for s in SECTIONS if profile in s.profiles]


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_section(section: Section, profile: ProfileName) -> dict[str, Any]:
    """Run one section; a failure or an absent module becomes a result saying so."""
    started = time.monotonic()
    cpu_started = _cpu_seconds()
    meta: dict[str, Any] = {
        "profile": profile,
        "clock": timing.clock(),
        "threads": timing.threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    module_name = f"bench.{section.name}"
    try:
        module = importlib.import_module(module_name)
        kwargs = {"quick": profile != "full", **section.kwargs.get(profile, {})}
        result: dict[str, Any] = module.run(**kwargs)
        meta["status"] = "ok"
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            hint = (
                " (install the bench extra: pip install -e '.[bench]')"
                if exc.name in ("transformers", "peft", "matplotlib")
                else ""
            )
            result = {"bench": section.name, "error": f"{exc}{hint}"}
            meta["status"] = "error"
        else:
            result = {"bench": section.name, "skipped": f"{module_name} is not in this tree"}
            meta["status"] = "skipped"
    except Exception as exc:  # one broken section must not lose the others' results
        result = {
            "bench": section.name,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
        }
        meta["status"] = "error"
    meta["seconds"] = round(time.monotonic() - started, 1)
    # CPU time (this process and the children it waited for: servers, load generators):
    # on a shared box, CPU seconds / cores estimates the wall time the section needs alone.
    meta["cpu_seconds"] = round(_cpu_seconds() - cpu_started, 1)
    result["suite"] = meta
    gc.collect()
    return result


def run_suite(profile: ProfileName, out: Path, only: list[str] | None = None) -> dict[str, Any]:
    """Run the selected sections, writing ``<out>/<name>.json`` and ``<out>/suite.json``."""
    torch.set_num_threads(timing.threads())
    out.mkdir(parents=True, exist_ok=True)
    sections = select(profile, only)
    suite_path = out / "suite.json"
    suite: dict[str, Any] = {}
    if only and suite_path.exists():
        suite = json.loads(suite_path.read_text())  # a partial run updates the record
    suite.update(
        profile=profile,
        machine=machine_info(timing.threads()),
        clock=timing.clock(),
        threads=timing.threads(),
    )
    suite.setdefault("sections", {})
    suite["ran"] = [s.name for s in sections]
    started = time.monotonic()
    for section in sections:
        print(f"[bench] {section.name}: {section.title} ({profile})", flush=True)
        result = run_section(section, profile)
        (out / f"{section.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        suite["sections"][section.name] = result["suite"]
        status = result["suite"]["status"]
        detail = result.get("error") or result.get("skipped") or ""
        print(f"[bench] {section.name}: {status} in {result['suite']['seconds']} s {detail}")
        suite_path.write_text(json.dumps(suite, indent=2) + "\n")
    suite["seconds"] = round(time.monotonic() - started, 1)
    suite_path.write_text(json.dumps(suite, indent=2) + "\n")
    return suite
