"""Typed configuration: one dataclass per stage, every hyperparameter of the paper's code.

Each field carries its default, its valid range or choices, its CLI flag and a help text, so the
CLI, the manifest's per-row overrides, the cache keys and the sidecars all read the same source of
truth. Defaults follow spec §13 (the original README command); quirks of the original are kept as
the default where they change outputs, each with a named corrected alternative.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong type; names the field and its flag."""

    def __init__(self, name: str, message: str):
        self.name = name
        super().__init__(f"{name} (--{name.replace('_', '-')}): {message}")


def _opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] | None = None, lo_open: bool = False) -> Any:
    """A dataclass field with the metadata the CLI and validation need."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices,
                                            "lo_open": lo_open})


@dataclass(frozen=True)
class ConceptConfig:
    """Stage 3, multi-vector concept inversion on the reference image (spec §5)."""

    num_vectors: int = _opt(3, "token vectors n learned for the concept", lo=1, hi=16)
    initializer_word: str = _opt("girl", "word whose embedding initialises the concept vectors "
                                 "(the original README uses 'girl')")
    max_train_steps: int = _opt(500, "optimizer updates (README 500; argparse default 50)",
                                lo=1, hi=100_000)
    gradient_accumulation_steps: int = _opt(4, "micro-batches per update", lo=1, hi=256)
    learning_rate: float = _opt(5e-4, "base learning rate", lo=0.0, hi=1.0, lo_open=True)
    scale_lr: bool = _opt(True, "multiply lr by accumulation x batch x processes (original: "
                          "always on, so lr = 2e-3)")
    adam_beta1: float = _opt(0.9, "AdamW beta1", lo=0.0, hi=1.0)
    adam_beta2: float = _opt(0.999, "AdamW beta2", lo=0.0, hi=1.0)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon", lo=0.0, hi=1.0, lo_open=True)
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay (also shrinks the concept rows)",
                                    lo=0.0, hi=1.0)
    use_l1: bool = _opt(True, "add the latent L1 term on the predicted clean latent "
                        "(README: on; argparse default: off)")
    l1_weight: float = _opt(1.0, "weight lambda of the latent L1 term", lo=0.0, hi=100.0)
    reference_resolution: int | None = _opt(None, "reference training size in pixels (default: the model's "
                                  "native size, 512 for SD 1.5)", lo=8, hi=4096)
    center_crop: bool = _opt(False, "center-crop the reference to a square before resizing "
                             "(original: off, the image is squashed)")
    flip_p: float = _opt(0.5, "probability of a horizontal flip per micro-step", lo=0.0, hi=1.0)
    batch_microsteps: bool = _opt(False, "run the accumulation micro-steps as one UNet batch "
                                  "(same expected update, different RNG order; faster)")
    seed: int = _opt(0, "random seed: flips, timesteps, noise, VAE samples", lo=0, hi=2**63 - 1)

    def effective_lr(self, num_processes: int = 1) -> float:
        """The original scales lr by accumulation x batch(1) x processes when scale_lr is on."""
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.gradient_accumulation_steps * num_processes


@dataclass(frozen=True)
class ContentConfig:
    """Stages 1-2, DDIM inversion and pivotal content inversion of the source (spec §3-§4).

    It owns T, w, the timestep grid and the inversion prompt: the content embeddings are fitted
    for exactly these, so fusion reads them from the content result and may not override them.
    """

    num_inference_steps: int = _opt(50, "DDIM steps T (inversion, fit and fusion)", lo=2, hi=1000)
    guidance_scale: float = _opt(7.5, "guidance w used by the fit and both fusion branches",
                                 lo=1.0, hi=50.0)
    num_inner_steps: int = _opt(50, "max Adam iterations per timestep", lo=0, hi=10_000)
    early_stop_epsilon: float = _opt(1e-5, "early-stop threshold at step 0", lo=0.0, hi=1.0)
    early_stop_slope: float = _opt(2e-5, "threshold increase per step (1e-5 + 2e-5*s)",
                                   lo=0.0, hi=1.0)
    inner_learning_rate: float = _opt(1e-2, "Adam lr at step 0", lo=0.0, hi=10.0, lo_open=True)
    inner_lr_decay: float = _opt(1e-2, "lr_s = lr * (1 - decay * s)", lo=0.0, hi=1.0)
    content_target: str = _opt("pivot", "fit target: 'pivot' (the code: previous inversion "
                               "latent) or 'x0' (the article's reading: predicted clean latent)",
                               choices=("pivot", "x0"))
    inversion_prompt: str = _opt("", "prompt of the inversion and of the fit's conditional slot")
    steps_offset: int = _opt(0, "DDIM steps_offset (original: 0, so timesteps 980..0)",
                             lo=0, hi=100)
    skip_identity_step: bool = _opt(True, "skip the UNet call of inversion step 0, which is the "
                                    "identity because alpha(-dt) = alpha(0)")
    resolution: int | None = _opt(None, "working size in pixels (default: the model's native "
                                  "size)", lo=8, hi=4096)


@dataclass(frozen=True)
class FusionConfig:
    """Stage 4, the two-branch sampler with attention injection (spec §6)."""

    cross_attention_injection_ratio: float = _opt(0.2, "cross-attention window r_x", lo=0.0,
                                                  hi=1.0)
    self_attention_injection_ratio: float = _opt(0.9, "self-attention window r_s", lo=0.0, hi=1.0)
    self_replace_max_tokens: int = _opt(1024, "self-attention is replaced only in layers with at "
                                        "most this many query tokens", lo=0, hi=1 << 24)
    reweight_value: float = _opt(0.5, "cross-attention reweight of the concept columns "
                                 "(1 disables it)", lo=0.0, hi=10.0)
    reweight_positions: str = _opt("original", "'original' reweights BOS and the first n-1 "
                                   "concept columns (the original's off-by-one); 'concept_tokens' "
                                   "the n concept columns", choices=("original", "concept_tokens"))
    window_rounding: str = _opt("original", "'original': cross window floor(r*(T+1)), self "
                                "floor(r*T); 'consistent': both floor(r*T)",
                                choices=("original", "consistent"))
    attention_impl: str = _opt("sdpa", "'sdpa': fused kernels, explicit probabilities only for "
                               "cross-attention; 'explicit': all probabilities materialised "
                               "(reference path)", choices=("sdpa", "explicit"))

    def cross_steps(self, num_steps: int) -> int:
        """Number of leading sampling steps with cross-attention injection."""
        span = num_steps + 1 if self.window_rounding == "original" else num_steps
        return int(self.cross_attention_injection_ratio * span)

    def self_steps(self, num_steps: int) -> int:
        """Number of leading sampling steps with self-attention injection."""
        return int(self.self_attention_injection_ratio * num_steps)


@dataclass(frozen=True)
class ModelConfig:
    """Where the base model comes from and how it runs; not a hyperparameter of the paper."""

    model: str = _opt("", "a local diffusers SD 1.x folder or an s3://bucket/prefix holding one")
    device: str = _opt("auto", "'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = _opt("fp32", "fp32 (faithful) or, on CUDA, fp16/bf16",
                      choices=("fp32", "fp16", "bf16"))


StageConfig = ConceptConfig | ContentConfig | FusionConfig | ModelConfig
C = TypeVar("C", ConceptConfig, ContentConfig, FusionConfig, ModelConfig)


def _field_type(f: dataclasses.Field) -> type:
    """The runtime type of a field from its annotation string (we use postponed annotations)."""
    ann = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if ann.startswith(name):
            return typ
    raise TypeError(f"unsupported config field type {ann}")


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def coerce(cfg_type: type[C], name: str, value: Any) -> Any:
    """Convert a raw value (CLI string, CSV cell, JSON value) to the field's type, or raise."""
    f = {f.name: f for f in fields(cfg_type)}.get(name)
    if f is None:
        raise ConfigError(name, f"unknown setting for {cfg_type.__name__}")
    typ = _field_type(f)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        if _optional(f):
            return None
        if typ is str and value == "":
            return ""
        raise ConfigError(name, "a value is required")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str) and "." in value:
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError(value)
                return int(as_float)
            return int(value)
        if typ is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"expected {typ.__name__}, got {value!r}") from None


def validate(cfg: StageConfig) -> StageConfig:
    """Check every field against its range and choices; returns cfg so it can be chained."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        meta = f.metadata
        if value is None:
            if not _optional(f):
                raise ConfigError(f.name, "a value is required")
            continue
        typ = _field_type(f)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise ConfigError(f.name, f"expected {typ.__name__}, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f.name, f"must be one of {', '.join(meta['choices'])}, "
                                      f"got {value!r}")
        lo, hi = meta.get("lo"), meta.get("hi")
        if typ in (int, float) and value != value:  # NaN
            raise ConfigError(f.name, "must be a number")
        if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
            op = ">" if meta.get("lo_open") else ">="
            raise ConfigError(f.name, f"must be {op} {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(f.name, f"must be <= {hi}, got {value}")
    if isinstance(cfg, ConceptConfig) and not cfg.initializer_word.strip():
        raise ConfigError("initializer_word", "must be a non-empty word")
    return cfg


def with_overrides(cfg: C, overrides: dict[str, Any]) -> C:
    """A copy of cfg with raw overrides coerced and validated (CLI flags, manifest cells)."""
    typed = {name: coerce(type(cfg), name, value) for name, value in overrides.items()}
    return validate(dataclasses.replace(cfg, **typed))


def to_dict(cfg: StageConfig) -> dict[str, Any]:
    """JSON-ready view, the form that goes into headers, sidecars and cache keys."""
    return dataclasses.asdict(cfg)


def from_dict(cfg_type: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config from its JSON view; unknown keys are an error, not silently dropped."""
    return with_overrides(cfg_type(), data)


# ---------------------------------------------------------------- argparse bridge
def add_arguments(parser: argparse.ArgumentParser, cfg_type: type[StageConfig],
                  title: str, skip: tuple[str, ...] = ()) -> None:
    """Expose each field as `--field-name` with its help, default and range (defaults = None so
    only flags the user gave become overrides)."""
    group = parser.add_argument_group(title)
    defaults = cfg_type()
    for f in fields(cfg_type):
        if f.name in skip:
            continue
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        extra = []
        if meta.get("choices"):
            extra.append("choices: " + ", ".join(meta["choices"]))
        elif meta.get("lo") is not None or meta.get("hi") is not None:
            extra.append(f"range: [{meta.get('lo')}, {meta.get('hi')}]")
        help_text = f"{meta['help']} (default: {default!r}" + (
            f"; {extra[0]})" if extra else ")")
        if _field_type(f) is bool:
            group.add_argument(flag, dest=f.name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                               help=help_text.replace("%", "%%"))


def from_namespace(cfg_type: type[C], ns: argparse.Namespace, base: C | None = None) -> C:
    """Build a validated config from parsed flags; unset flags keep base's (or default) values."""
    overrides = {f.name: getattr(ns, f.name) for f in fields(cfg_type)
                 if getattr(ns, f.name, None) is not None}
    return with_overrides(base if base is not None else cfg_type(), overrides)
