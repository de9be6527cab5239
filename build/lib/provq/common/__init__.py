"""What every room may import: the error types, typed dataclass configs, and versioned files."""

from provq.common.errors import ConfigError, FormatError, UserError

__all__ = ["ConfigError", "FormatError", "UserError"]
