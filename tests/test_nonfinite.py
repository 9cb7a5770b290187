"""A stage result holding NaN or Inf fails its job and is never cached (issue 20).

Half-precision inversions can overflow; stored under its key, such a result would answer every
later pair that uses it, each reported ok. The UNet here is the oracle's closed-form stub, made
to return NaN (or Inf) at one chosen forward call, in a way that also reaches the gradients (the
poison is multiplied by the stub's text score s(e)), so each stage's result really goes bad.
The models claim fp16 (the stub then computes in half precision on CPU), as a GPU run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.golden import oracle
from vct.batch import engine
from vct.batch.jobs import load, nonfinite, run_content_batch, run_in_order
from vct.batch.plan import fusion_job, hash_inputs, plan_run
from vct.batch.settings import RunSettings
from vct.batch.workers import ExecutorSettings
from vct.cache import StageCache
from vct.manifest import parse_manifest

T = 3
SETTINGS = {"concept": {"max_train_steps": 2, "reference_resolution": 64},
            "content": {"num_inference_steps": T, "num_inner_steps": 2, "resolution": 64}}


class PoisonedUNet(oracle.StubUNet):
    """The stub; its forward call number ``at`` (1-based, over its life) returns ``value`` in
    the batch rows ``rows`` (all when None), through s(e) so gradients carry it too."""

    def __init__(self, at: int | None = None, value: float = math.nan,
                 rows: list[int] | None = None):
        super().__init__((4, 8, 8), (77, 32), alpha=0.01, beta=0.01)
        self.at, self.value, self.rows, self.calls = at, value, rows, 0

    def forward(self, z, t, encoder_hidden_states, **_):
        self.calls += 1
        sample = self.formula(z, t, encoder_hidden_states)
        if self.calls == self.at:
            mask = torch.zeros(len(z), 1, 1, 1, dtype=torch.bool)
            mask[self.rows if self.rows is not None else slice(None)] = True
            poison = self.value * self.score(encoder_hidden_states)
            sample = torch.where(mask, sample + poison, sample)
        return SimpleNamespace(sample=sample)


def _models(models, unet: PoisonedUNet):
    return dataclasses.replace(models, unet=unet, dtype=torch.float16, unet_evals=Counter())


def _plan(tmp_path: Path, rows: list[tuple[Path, Path, str]]):
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,reference,output_name\n"
                        + "".join(f"{s},{r},{n}\n" for s, r, n in rows))
    parsed = parse_manifest(manifest.read_bytes(), str(manifest))
    hashes = hash_inputs([u for r in parsed.rows for u in (r.source, r.reference)])
    plan = plan_run(parsed, hashes, "m" * 64, RunSettings.build(SETTINGS),
                    str(tmp_path / "out" / "run"), "run")
    return plan, ExecutorSettings(model="unused", cache_uri=str(tmp_path / "cache"))


def test_nonfinite_names_each_bad_tensor():
    tensors = {"a": torch.tensor([1.0, math.nan]), "b": torch.tensor([math.inf, 1.0]),
               "c": None, "d": torch.zeros(2, dtype=torch.uint8), "e": torch.ones(2)}
    assert nonfinite(tensors) == {"a": "NaN", "b": "Inf"}


@pytest.mark.parametrize(("kind", "at", "value", "found"), [
    ("concept", 1, math.nan, "NaN in vectors"),
    ("content", 2, math.nan, "NaN in x_T"),  # S1, the DDIM inversion (calls 1..T)
    # S2, the fit (after the T inversion calls): an Inf gradient makes Adam's update NaN
    ("content", T + 2, math.inf, "NaN in embeddings"),
    ("fusion", 2, math.nan, "NaN in latents"),
], ids=["concept", "content-inversion", "content-fit", "fusion"])
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # NaN pixels to uint8
def test_a_nonfinite_stage_fails_its_pairs_and_is_never_cached(tmp_path, models, images,
                                                               kind, at, value, found):
    """The poisoned stage's job fails in one line naming the stage, the input and the
    precision; nothing is cached under its key; the pair using it is failed with that line in
    the summary, run.json and the report; the stages before it are stored as usual."""
    plan, executor = _plan(tmp_path, [(images["src_a"], images["ref"], "house")])

    def runner(jobs, settings, **_):
        unet = PoisonedUNet(at if jobs[0].kind == kind else None, value)
        cache = StageCache(settings.cache_uri)
        done = dict(run_in_order(_models(models, unet), jobs, list(range(len(jobs))), cache))
        return [done[i] for i in range(len(jobs))]

    outcome = engine.run_pool(plan, executor, runner=runner)
    summary = engine.summarize(plan, outcome.pairs, outcome.stages)
    engine.finish(summary, "2026-01-01T00:00:00+00:00")
    data = json.loads((Path(plan.run_uri) / "run.json").read_text())

    pair = summary.pairs[0]
    role = "reference" if kind == "concept" else "source"
    uri = images["ref"] if kind == "concept" else images["src_a"]
    stage = {"concept": "concept inversion", "content": "content inversion",
             "fusion": "fusion"}[kind]
    line = f"{role} {uri}: {stage} produced non-finite values ({found}"
    assert pair.status == "failed" and line in pair.reason and "at fp16" in pair.reason
    assert "--dtype fp32 (or bf16)" in pair.reason and "\n" not in pair.reason
    assert summary.status == "failed" and data["status"] == "failed"
    assert any(line in f["reason"] for f in data["failures"])
    run = Path(plan.run_uri)
    assert line in (run / "report.html").read_text() and not (run / "house.png").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"

    cache = StageCache(executor.cache_uri)
    key = {"concept": pair_key(plan, "concept"), "content": pair_key(plan, "content"),
           "fusion": pair_key(plan, "fusion")}
    assert not cache.contains(kind, key[kind]), "a non-finite result must never be cached"
    earlier = {"concept": [], "content": [], "fusion": ["concept", "content"]}[kind]
    assert all(cache.contains(k, key[k]) for k in earlier)


def pair_key(plan, kind: str) -> str:
    """The key of the run's one job of this kind."""
    if kind == "fusion":
        return fusion_job([plan.pairs[0]]).key
    (job,) = plan.jobs(kind)
    return job.key


def test_a_batch_with_one_nonfinite_source_stores_the_others(tmp_path, models, images):
    """Two sources fitted in one batch, the UNet poisoning one batch row: that source fails
    alone (never cached), the other is stored from the same batch, not recomputed."""
    plan, executor = _plan(tmp_path, [(images["src_a"], images["ref"], "house"),
                                      (images["src_b"], images["ref"], "tree")])
    jobs = plan.jobs("content")
    unet = PoisonedUNet(at=2, rows=[0])
    cache = StageCache(executor.cache_uri)
    outcomes = run_content_batch(_models(models, unet), jobs, cache)
    bad = [o for o in outcomes if not o.ok]
    good = [o for o in outcomes if o.ok]
    assert len(bad) == 1 and len(good) == 1, [o.error for o in outcomes]
    assert "content inversion produced non-finite values (NaN in x_T" in bad[0].error
    assert not cache.contains("content", bad[0].key) and cache.contains("content", good[0].key)
    stored = load(cache, "content", good[0].key)
    assert stored.provenance["batch_size"] == 2, "stored from the batch, not refitted alone"
