"""Deprecated alias of `deepzero_apps.blackbox.losses` (moved in 0.2; import from `deepzero_apps.blackbox`)."""

import sys
import warnings

from .blackbox import losses

warnings.warn(
    "deepzero_apps.blackbox_loss moved to deepzero_apps.blackbox; this alias will be removed in 0.3",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = losses
