"""Keep third-party chatter out of our output: every entry point calls :func:`quiet_libraries`.

The accelerate launcher's stderr tail goes into job error messages, and the CLI's stderr is for
our one-line errors and progress bars, so diffusers/transformers notices are silenced.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """diffusers/transformers chatter (torchvision notices, weight-loading bars) is not ours."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:
        pass
