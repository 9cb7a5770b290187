"""Typed configuration: one frozen pydantic model per stage, every hyperparameter of the paper.

Each field carries its default, its bounds or choices and a description. The same models are the
stage functions' configs, the nested form of the Prefect flows' settings (Prefect renders
pydantic parameters as forms), the source of the CLI flags and the coercer of manifest override
cells, so a bound is written once and checked everywhere, before any model work. Defaults follow
spec §13 (the original README command); quirks of the original are kept as the default where
they change outputs, each with a named corrected alternative.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vct.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is out of range or of the wrong type; names the field and its flag."""

    def __init__(self, name: str, message: str):
        self.name = name
        flag = name.rsplit(".", 1)[-1].replace("_", "-")
        super().__init__(f"{name} (--{flag}): {message}")


class StageConfig(BaseModel):
    """Frozen (hashable, safe to share between jobs), strict about unknown fields and NaN."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False,
                              validate_default=True)


class ConceptConfig(StageConfig):
    """Stage 3, multi-vector concept inversion on the reference image (spec §5)."""

    num_vectors: int = Field(3, ge=1, le=16, description="token vectors n learned for the concept")
    initializer_word: str = Field("girl", description="word whose embedding initialises the "
                                  "concept vectors (the original README uses 'girl')")
    max_train_steps: int = Field(500, ge=1, le=100_000, description="optimizer updates (README "
                                 "500; argparse default 50)")
    gradient_accumulation_steps: int = Field(4, ge=1, le=256,
                                             description="micro-batches per update")
    learning_rate: float = Field(5e-4, gt=0.0, le=1.0, description="base learning rate")
    scale_lr: bool = Field(True, description="multiply lr by accumulation x batch x processes "
                           "(original: always on, so lr = 2e-3)")
    adam_beta1: float = Field(0.9, ge=0.0, le=1.0, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0.0, le=1.0, description="AdamW beta2")
    adam_epsilon: float = Field(1e-8, gt=0.0, le=1.0, description="AdamW epsilon")
    adam_weight_decay: float = Field(1e-2, ge=0.0, le=1.0, description="AdamW weight decay (also "
                                     "shrinks the concept rows)")
    use_l1: bool = Field(True, description="add the latent L1 term on the predicted clean latent "
                         "(README: on; argparse default: off)")
    l1_weight: float = Field(1.0, ge=0.0, le=100.0, description="weight lambda of the latent L1 "
                             "term")
    reference_resolution: int | None = Field(None, ge=8, le=4096, description="reference "
                                             "training size in pixels (default: the model's "
                                             "native size, 512 for SD 1.5)")
    center_crop: bool = Field(False, description="center-crop the reference to a square before "
                              "resizing (original: off, the image is squashed)")
    flip_p: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip per "
                          "micro-step")
    batch_microsteps: bool = Field(False, description="run the accumulation micro-steps as one "
                                   "UNet batch (same expected update, different RNG order; "
                                   "faster)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="random seed: flips, timesteps, noise, "
                      "VAE samples")

    @field_validator("initializer_word")
    @classmethod
    def _word(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty word")
        return value

    def effective_lr(self, num_processes: int = 1) -> float:
        """The original scales lr by accumulation x batch(1) x processes when scale_lr is on."""
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.gradient_accumulation_steps * num_processes


class ContentConfig(StageConfig):
    """Stages 1-2, DDIM inversion and pivotal content inversion of the source (spec §3-§4).

    It owns T, w, the timestep grid and the inversion prompt: the content embeddings are fitted
    for exactly these, so fusion reads them from the content result and may not override them.
    """

    num_inference_steps: int = Field(50, ge=2, le=1000, description="DDIM steps T (inversion, "
                                     "fit and fusion)")
    guidance_scale: float = Field(7.5, ge=1.0, le=50.0, description="guidance w used by the fit "
                                  "and both fusion branches")
    num_inner_steps: int = Field(50, ge=0, le=10_000, description="max Adam iterations per "
                                 "timestep")
    early_stop_epsilon: float = Field(1e-5, ge=0.0, le=1.0, description="early-stop threshold "
                                      "at step 0")
    early_stop_slope: float = Field(2e-5, ge=0.0, le=1.0, description="threshold increase per "
                                    "step (1e-5 + 2e-5*s)")
    inner_learning_rate: float = Field(1e-2, gt=0.0, le=10.0, description="Adam lr at step 0")
    inner_lr_decay: float = Field(1e-2, ge=0.0, le=1.0, description="lr_s = lr * (1 - decay * s)")
    content_target: Literal["pivot", "x0"] = Field(
        "pivot", description="fit target: 'pivot' (the code: previous inversion latent) or 'x0' "
        "(the article's reading: predicted clean latent)")
    inversion_prompt: Literal[""] = Field(
        "", description="prompt of the inversion and of the fit's conditional slot; fusion's "
        "token map is the original's for \"\" only, so nothing else is accepted")
    steps_offset: int = Field(1, ge=0, le=100, description="DDIM steps_offset (the original runs "
                              "1, timesteps 981..1: its pipeline rewrites the 0 it was built "
                              "with; 0 gives 980..0 and is not the original's)")
    skip_identity_step: bool = Field(True, description="at steps_offset 0 only: skip the UNet "
                                     "call of inversion step 0, the identity there because "
                                     "alpha(-dt) = alpha(0)")
    resolution: int | None = Field(None, ge=8, le=4096, description="working size in pixels "
                                   "(default: the model's native size)")


class FusionConfig(StageConfig):
    """Stage 4, the two-branch sampler with attention injection (spec §6)."""

    cross_attention_injection_ratio: float = Field(0.2, ge=0.0, le=1.0,
                                                   description="cross-attention window r_x")
    self_attention_injection_ratio: float = Field(0.9, ge=0.0, le=1.0,
                                                  description="self-attention window r_s")
    self_replace_max_tokens: int = Field(1024, ge=0, le=1 << 24, description="self-attention is "
                                         "replaced only in layers with at most this many query "
                                         "tokens")
    reweight_value: float = Field(0.5, ge=0.0, le=10.0, description="cross-attention reweight "
                                  "of the concept columns (1 disables it)")
    reweight_positions: Literal["original", "concept_tokens"] = Field(
        "original", description="'original' reweights BOS and the first n-1 concept columns "
        "(the original's off-by-one); 'concept_tokens' the n concept columns")
    window_rounding: Literal["original", "consistent"] = Field(
        "original", description="'original': cross window floor(r*(T+1)), self floor(r*T); "
        "'consistent': both floor(r*T)")
    attention_impl: Literal["sdpa", "explicit"] = Field(
        "sdpa", description="'sdpa': fused kernels, explicit probabilities only for "
        "cross-attention; 'explicit': all probabilities materialised (reference path)")

    def cross_steps(self, num_steps: int) -> int:
        """Number of leading sampling steps with cross-attention injection."""
        span = num_steps + 1 if self.window_rounding == "original" else num_steps
        return int(self.cross_attention_injection_ratio * span)

    def self_steps(self, num_steps: int) -> int:
        """Number of leading sampling steps with self-attention injection."""
        return int(self.self_attention_injection_ratio * num_steps)


STAGES: dict[str, type[StageConfig]] = {"concept": ConceptConfig, "content": ContentConfig,
                                        "fusion": FusionConfig}
C = TypeVar("C", bound=BaseModel)


def config_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    """The first problem of a pydantic error as one line naming the field and its flag."""
    err = exc.errors(include_url=False)[0]
    name = ".".join(str(p) for p in err["loc"]) or "settings"
    kind, ctx = err["type"], err.get("ctx") or {}
    short = {"less_than_equal": "must be <= {le}", "greater_than_equal": "must be >= {ge}",
             "greater_than": "must be > {gt}", "less_than": "must be < {lt}",
             "int_parsing": "expected int", "int_from_float": "expected int",
             "float_parsing": "expected float", "bool_parsing": "expected true or false",
             "string_pattern_mismatch": "must match {pattern}"}
    if kind == "extra_forbidden":
        return ConfigError(prefix + name, "unknown setting")
    if kind == "missing":
        return ConfigError(prefix + name, "a value is required")
    if kind == "literal_error":
        message = "must be one of " + ctx.get("expected", "").replace("'", "")
    elif kind in short:
        message = short[kind].format(**ctx)
    else:
        message = err["msg"].removeprefix("Value error, ")
    return ConfigError(prefix + name, f"{message}, got {err['input']!r}")


def with_overrides(cfg: C, overrides: dict[str, Any], prefix: str = "") -> C:
    """A copy of cfg with raw overrides (CLI strings, CSV cells, JSON values) coerced and
    checked by the model's own field types and bounds."""
    try:
        return type(cfg).model_validate({**cfg.model_dump(), **overrides})
    except ValidationError as exc:
        raise config_error(exc, prefix) from None


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-ready view, the form that goes into headers, sidecars and cache keys."""
    return cfg.model_dump(mode="json")


def from_dict(cfg_type: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config from its JSON view; unknown keys are an error, not silently dropped."""
    return with_overrides(cfg_type(), data)


# ---------------------------------------------------------------- argparse bridge
def _choices(annotation: Any) -> tuple[str, ...] | None:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is Literal and args:
        return tuple(str(a) for a in args)
    return None


def _bounds(info: Any) -> str:
    lo = hi = None
    for meta in info.metadata:
        lo = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else lo
        lo = getattr(meta, "gt", None) if getattr(meta, "gt", None) is not None else lo
        hi = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else hi
    return f"range: [{lo}, {hi}]" if lo is not None or hi is not None else ""


def add_arguments(parser: argparse.ArgumentParser, cfg_type: type[BaseModel], title: str,
                  skip: tuple[str, ...] = ()) -> None:
    """Expose each field as `--field-name` with its description, default and bounds (argparse
    defaults are None, so only flags the user gave become overrides)."""
    group = parser.add_argument_group(title)
    for name, info in cfg_type.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        choices = _choices(info.annotation)
        extra = ("choices: " + ", ".join(repr(c) for c in choices)) if choices else _bounds(info)
        help_text = f"{info.description} (default: {info.default!r}" + (
            f"; {extra})" if extra else ")")
        if info.annotation is bool:
            group.add_argument(flag, dest=name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                               help=help_text.replace("%", "%%"))


def from_namespace(cfg_type: type[C], ns: argparse.Namespace, base: C | None = None) -> C:
    """Build a checked config from parsed flags; unset flags keep base's (or default) values."""
    overrides = {name: getattr(ns, name) for name in cfg_type.model_fields
                 if getattr(ns, name, None) is not None}
    return with_overrides(base if base is not None else cfg_type(), overrides)
