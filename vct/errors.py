"""Which exceptions are the user's to fix: their message is already a complete one-line answer.

The CLI prints them without a traceback; the executor and the flow report them per row or job.
"""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Bad input of any kind: config values, model folders, images, files, manifests, storage,
    stage results. Imported lazily so `vct --help` stays fast."""
    from vct.artifacts import ArtifactError
    from vct.config import ConfigError
    from vct.fusion import FusionMismatch
    from vct.images import ImageError
    from vct.manifest import ManifestError
    from vct.models import ModelError
    from vct.storage import StorageError
    from vct.translate import InputError

    return (ConfigError, ModelError, ImageError, InputError, FusionMismatch, ArtifactError,
            ManifestError, StorageError, FileExistsError)
