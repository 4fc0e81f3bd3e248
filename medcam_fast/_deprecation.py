"""One warning class and one helper for the names kept for one release after a rename."""
from __future__ import annotations

import warnings


class MedCAMDeprecationWarning(DeprecationWarning):
    """An old medcam_fast name was used; it works for one more release."""


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warns that ``old`` is now ``new`` (``stacklevel`` 3: the caller of the aliasing function)."""
    warnings.warn(f"medcam_fast: {old} is deprecated; use {new} (the old name goes in the next release)",
                  MedCAMDeprecationWarning, stacklevel=stacklevel)
