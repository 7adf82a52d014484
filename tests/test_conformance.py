"""Every registered method (built-in and installed plugins) × every tiny backbone family."""

from unipeft.testing.suite import test_conformance

__all__ = ["test_conformance"]
