"""What every benchmark section shares: timing, UNet counting and timing, test images, manifests,
targets (met / not met, never adjusted) and the printed table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def tiny_model() -> str:
    """The offline random-weight model's folder (built once, as `--model tiny` does)."""
    from vct.batch.engine import tiny_model_folder

    return tiny_model_folder()


def timed(fn: Callable, repeats: int = 1):
    """Best of `repeats` wall times (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def evals(models, fn: Callable):
    """fn's result and the UNet evaluations the counting wrapper saw during it."""
    before = dict(models.unet_evals)
    result = fn()
    return result, {k: v - before.get(k, 0) for k, v in models.unet_evals.items()
                    if v != before.get(k, 0)}


class UNetClock:
    """Seconds spent inside ``VCTModels.eps`` (every UNet call of every stage), in this process:
    the model cost to subtract from a wall time to get the orchestration around it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._lock = threading.Lock()

    @contextmanager
    def installed(self):
        from vct.models import VCTModels

        original = VCTModels.eps
        clock = self

        def eps(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                with clock._lock:
                    clock.seconds += time.perf_counter() - start
                    clock.calls += 1

        VCTModels.eps = eps
        try:
            yield self
        finally:
            VCTModels.eps = original


def total_evals(stages: dict) -> int:
    """Sample evaluations of the UNet over a run's stage reports (``StageReport.unet_evals``:
    what the counting wrapper saw in each job; forward+backward ones included)."""
    return int(sum(sum(r.unet_evals.values()) for r in stages.values()))


def write_image(path: Path, seed: int, size: int = 32) -> Path:
    """A distinct small RGB image: smooth gradients plus seeded noise (never two alike)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    base = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * rng.uniform(60, 200, size=3)
    pixels = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A manifest of (source, reference, output_name) rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("source,reference,output_name\n"
                    + "".join(f"{s},{r},{n}\n" for s, r, n in rows))
    return path


def crossed(folder: Path, sources: int, references: int, size: int = 32,
            seed: int = 0) -> tuple[Path, list[Path], list[Path]]:
    """Every source with every reference: the manifest, the sources, the references."""
    srcs = [write_image(folder / f"s{i:03d}.png", seed + i, size) for i in range(sources)]
    refs = [write_image(folder / f"r{j:03d}.png", seed + 10_000 + j, size)
            for j in range(references)]
    rows = [(str(s), str(r), f"{s.stem}_{r.stem}") for s in srcs for r in refs]
    return write_manifest(folder / "m.csv", rows), srcs, refs


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- targets and the table
@dataclass
class Target:
    """One figure against its target: ``value <= limit`` (or ``>=``), measured, never adjusted."""

    name: str
    value: float | None
    op: str
    limit: float
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def to_dict(self) -> dict:
        return {"value": self.value, "target": f"{self.op} {self.limit:g}", "met": self.met,
                **({"note": self.note} if self.note else {})}


@dataclass
class Section:
    """One section's results (a nested dict for results.json), its targets and table rows."""

    name: str
    data: dict = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    rows: list[tuple[str, str]] = field(default_factory=list)  # extra (label, value) lines

    def target(self, name: str, value: float | None, op: str, limit: float,
               note: str = "") -> Target:
        t = Target(name, None if value is None else float(value), op, limit, note)
        self.targets.append(t)
        return t

    def row(self, label: str, value: str) -> None:
        self.rows.append((label, value))


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def table(sections: list[Section]) -> str:
    """The printed table: every target with its value and verdict, then the other figures."""
    lines = [f"{'figure':<46} {'value':>12} {'target':>10}  met",
             "-" * 76]
    for section in sections:
        for t in section.targets:
            verdict = {True: "yes", False: "NO", None: "n/a"}[t.met]
            lines.append(f"{t.name:<46} {fmt(t.value):>12} {t.op + ' ' + f'{t.limit:g}':>10}"
                         f"  {verdict}")
    lines.append("")
    for section in sections:
        if section.rows:
            lines.append(f"[{section.name}]")
            lines += [f"  {label:<44} {value}" for label, value in section.rows]
    return "\n".join(lines)


def set_threads(n: int | None) -> int:
    """torch's intra-op threads for this process (None: the thread budget)."""
    from vct.threads import apply_thread_budget

    return apply_thread_budget(override=n)




def markdown(results: dict) -> str:
    """The targets of a results.json as a Markdown table (docs/performance.md)."""
    lines = ["| figure | value | target | met |", "|---|---|---|---|"]
    for name, t in results.get("targets", {}).items():
        verdict = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| `{name}` | {fmt(t['value'])} | {t['target']} | {verdict} |")
    return "\n".join(lines)


# Stage settings of every `--quick` smoke run (toy sizes; the figures are not meaningful).
QUICK = {"concept": {"max_train_steps": 2, "gradient_accumulation_steps": 2,
                     "reference_resolution": 32},
         "content": {"num_inference_steps": 2, "num_inner_steps": 2, "resolution": 32},
         "fusion": {}}
