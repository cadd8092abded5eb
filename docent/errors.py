"""Typed errors. Core code raises these; only the CLI and the HTTP layer translate them."""


class DocentError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ConfigError(DocentError):
    """A setting has a value Docent cannot use."""


class ModelNotFoundError(DocentError):
    """A configured model cannot be found offline."""


class IndexBusyError(DocentError):
    """Another process holds the index lock (a refresh is running)."""


class IndexMismatchError(DocentError):
    """The stored index was built with settings incompatible with the current ones."""


class EmptyIndexError(DocentError):
    """There is no index yet, or it holds no chunks."""


class DiskFullError(DocentError):
    """A write failed for lack of disk space; what was stored before is unchanged."""
