"""The did-you-mean hint that every validation message appends for a misspelt key or choice."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(value: object, choices: Iterable[str], *, n: int = 3, prefix: str = "") -> str:
    """` (did you mean 'a', 'b'?)` for the choices closest to `value`, or "" when none is close.

    `prefix` is put before each suggestion (a dotted section path, say) so that the hint reads as the key
    the user should have written.
    """
    close = difflib.get_close_matches(str(value), sorted(set(choices)), n=n)
    return f" (did you mean {', '.join(prefix + repr(c) for c in close)}?)" if close else ""
