"""Errors of the stage-2 prior that callers may want to catch by type."""

from provq.common.errors import UserError


class CodeRangeError(UserError, ValueError):
    """Image codes (or labels) outside the range a prior or a shard was built for."""


class FingerprintMismatchError(UserError, ValueError):
    """Codes or a prior that belong to a different tokenizer than the one in use."""


def check_fingerprint(
    found: str | None, expected: str | None, what: str, expected_from: str = "the tokenizer in use"
) -> None:
    """Raise FingerprintMismatchError naming both fingerprints when they differ.

    `None` on either side means "not bound to a tokenizer", which is not checked:
    a prior built by hand has no fingerprint until it is trained on codes.
    """
    if found is None or expected is None or found == expected:
        return
    raise FingerprintMismatchError(
        f"tokenizer fingerprint mismatch: {what} was made with tokenizer {found}, "
        f"but {expected_from} is {expected}; they do not belong together "
        "(re-extract the codes or retrain the prior with the right tokenizer)"
    )
