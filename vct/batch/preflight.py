"""Refuse before work: everything a run can know is wrong before it claims, writes or computes.

A run that fails per job after every inversion was computed costs hours and looks like a
model problem; a run refused up front costs a second and names the setting. The engine calls
:func:`check_request` from :func:`vct.batch.engine.prepare` (no reading of the manifest or the
model: the settings, the device and precision, the output and cache locations) and
:func:`check_model` from :func:`vct.batch.engine.plan` once the model folder is local (its
layout and the sizes its VAE and UNet can work at), before any job. ``vct run`` calls both
before Prefect starts, so each refusal is one line and exit code 2; the flows call them before
any claim or write. Every refusal is a :class:`vct.errors.UserError` naming what to change.
"""

from __future__ import annotations

from pathlib import Path

from vct import storage
from vct.batch.settings import RunSettings
from vct.config import ConfigError
from vct.models import check_device, check_layout, model_geometry


def check_request(output_uri: str, cache_uri: str, settings: RunSettings) -> None:
    """The device and dtype exist on this machine, and the output and cache locations can be
    written (a folder, not a file; an existing bucket that accepts a write)."""
    check_device(settings.device, settings.dtype)
    storage.check_writable(output_uri)
    if cache_uri != storage.join(output_uri, "_cache"):
        storage.check_writable(cache_uri)


def check_resolutions(folder: Path, settings: RunSettings) -> None:
    """Working sizes the model can run at: a multiple of the VAE factor, and large enough that
    the UNet's deepest level is at least 2x2 (read from the config files, no weights)."""
    geometry = model_geometry(folder)
    for name, value in (("content.resolution", settings.content.resolution),
                        ("concept.reference_resolution", settings.concept.reference_resolution)):
        if value is None:  # the model's native size, always valid
            continue
        if value % geometry.vae_factor:
            raise ConfigError(name, f"{value} is not a multiple of the model's VAE factor "
                              f"{geometry.vae_factor}")
        if value < geometry.min_resolution:
            raise ConfigError(name, f"{value} is too small for this model (at least "
                              f"{geometry.min_resolution}: its UNet needs a latent larger than "
                              f"{geometry.unet_factor} cells)")


def check_model(folder: Path, settings: RunSettings) -> None:
    """A local model folder: an SD 1.x layout, and every working size valid for it."""
    check_layout(folder)
    check_resolutions(folder, settings)
