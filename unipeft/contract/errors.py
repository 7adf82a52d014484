"""Exceptions raised by unipeft. Every one names the problem and, where there is one, the fix."""

from __future__ import annotations


class UnipeftError(Exception):
    """Base class of unipeft's errors."""


class ConfigError(UnipeftError, ValueError):
    """A method configuration value is invalid."""


class TargetError(UnipeftError, ValueError):
    """Targets do not resolve to sites the method can attach to."""


class AdapterError(UnipeftError, ValueError):
    """An adapter name is unknown, taken, or an operation does not fit its method."""


class MergeError(AdapterError):
    """``merge()`` was asked of a method or site that cannot be merged."""


class LoadError(UnipeftError, ValueError):
    """A saved adapter directory cannot be loaded onto this backbone."""


class PluginError(UnipeftError, RuntimeError):
    """A plugin failed to load or registered something invalid."""
