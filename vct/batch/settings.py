"""The typed settings of a run, defined once: the flows' parameter (a Prefect form), the CLI's
flags and the planner's input.

Every bound lives on a field, so a bad value is refused with its name when the settings are
built (a flow parameter, a flag, a `--set`), before any manifest is read or model loaded.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from vct.config import ConceptConfig, ConfigError, ContentConfig, FusionConfig, config_error
from vct.storage.links import MAX_LINK_EXPIRY_S

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,2})?)$")
TINY_MODEL = "tiny"
"""The name that asks for the offline random-weight test model; nothing else ever selects it."""
MINI_MODEL = "mini"
"""The name of the small trained model shipped in the package (vct/mini/, docs/mini-model.md)."""


class RunSettings(BaseModel):
    """How one manifest is run: where stage results are cached, how jobs are executed, and the
    run-wide stage configs (rows may still override the concept word, the seed and fusion)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    cache_uri: str | None = Field(None, description="stage cache prefix (a folder or s3:// "
                                  "URI); empty = <output_uri>/_cache")
    checkpoint_config: str | None = Field(None, description="config folder of a single-file "
                                          "checkpoint (SD 1.x component configs, tokenizer, "
                                          "scheduler; no weights), for variants whose sizes "
                                          "differ from SD 1.5's; empty = SD 1.5's, shipped")
    strict: bool = Field(False, description="refuse the whole manifest, before any model work, "
                         "if any row is bad (default: bad rows are reported and skipped)")
    executor: Literal["local", "accelerate"] = Field(
        "local", description="run stage jobs in this process, or across every GPU of the node "
        "with accelerate")
    num_processes: int | None = Field(None, ge=1, le=64, description="accelerate processes "
                                      "(default: one per GPU)")
    device: str = Field("auto", pattern=DEVICE_RE.pattern, description="'auto' (CUDA when "
                        "present), 'cpu', 'cuda' or 'cuda:N'")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="UNet precision: fp32 "
                                                   "(faithful) or, on CUDA, fp16/bf16")
    threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads per "
                                "process (default: VCT_THREADS, else the cores this process "
                                "may use divided by the ranks on the node)")
    content_batch: int = Field(1, ge=1, le=64, description="sources fitted together in one "
                               "batch, each with its own early stop; 1 is bit-for-bit the "
                               "one-source computation")
    shards: int = Field(1, ge=1, le=1024, description="split the run's jobs into this many "
                        "shard flow runs of the restyle-shard deployment, taken by any workers "
                        "of its pool (1 = no sharding: everything in this flow run); with "
                        "shard_jobs, the most shard flow runs one phase may use")
    shard_jobs: int | None = Field(None, ge=1, le=1_000_000, description="target jobs per "
                                   "shard: a phase of N jobs runs as ceil(N / shard_jobs) "
                                   "shards, at most `shards` (needs shards > 1; empty = "
                                   "always `shards` shards)")
    plan_threads: int = Field(8, ge=1, le=256, description="inputs read and hashed at once "
                              "while planning (threads; each streams one input through sha256 "
                              "and probes its header, S3 latency bound)")
    max_reference_images: int = Field(16, ge=1, le=1000, description="most reference images "
                                      "one concept may learn from (a ';' list, a folder or "
                                      "an s3:// prefix); a row naming more is bad")
    keep_trajectories: bool = Field(False, description="also store each source's inversion "
                                    "latents (about 3.3 MB per source at 512 px) in its "
                                    "content entry, for debugging; a "
                                    "separate content cache key, so outputs are re-fused once")
    report_link_expiry_s: int = Field(MAX_LINK_EXPIRY_S, ge=60, le=MAX_LINK_EXPIRY_S,
                                      description="seconds the flow's link to report.html "
                                      "works, for an s3:// output (a presigned URL; at most 7 "
                                      "days, S3's limit); a local output gets its file:// path")
    concept: ConceptConfig = Field(default_factory=ConceptConfig,
                                   description="stage 3, concept inversion (per reference)")
    content: ContentConfig = Field(default_factory=ContentConfig,
                                   description="stages 1-2, content inversion (per source)")
    fusion: FusionConfig = Field(default_factory=FusionConfig,
                                 description="stage 4, fusion (per pair)")

    @field_validator("shard_jobs")
    @classmethod
    def _shard_jobs_needs_shards(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("shards", 1) <= 1:
            raise ValueError("needs shards > 1 (shards is then the most shard flow runs a "
                             "phase may use)")
        return value

    @classmethod
    def build(cls, values: dict[str, Any] | None = None) -> RunSettings:
        """Settings from plain values (JSON, parsed flags), refused in one line naming the
        field, e.g. ``concept.flip_p (--flip-p): ...``."""
        try:
            return cls.model_validate(values or {})
        except ValidationError as exc:
            raise config_error(exc) from None

    def with_stage_overrides(self, overrides: dict[str, dict[str, Any]]) -> RunSettings:
        """A copy with ``{"concept": {"max_train_steps": "100"}, ...}`` applied and checked."""
        data = self.model_dump()
        for stage, values in overrides.items():
            if stage not in ("concept", "content", "fusion"):
                raise ConfigError(stage, "unknown stage; use one of concept, content, fusion")
            if not isinstance(values, dict):
                raise ConfigError(stage, "overrides must map field names to values")
            data[stage] = {**data[stage], **values}
        return self.build(data)

    def stage_dict(self) -> dict[str, dict]:
        """The three stage configs as JSON: what a run's identity and sidecars record."""
        return {name: getattr(self, name).model_dump(mode="json")
                for name in ("concept", "content", "fusion")}


def require_model(model: str | None) -> str:
    """A run needs a model named explicitly: an empty value is an error, never a silent
    fallback to the random test model (which would write noise to a real bucket)."""
    if not model or not str(model).strip():
        raise ConfigError("model", "a model is required: a diffusers SD 1.x folder, a "
                          "single-file .safetensors/.ckpt checkpoint, an s3:// URI of either, "
                          f"'{MINI_MODEL}' for the shipped mini model, or "
                          f"'{TINY_MODEL}' for the offline random-weight test model")
    return str(model).strip()
