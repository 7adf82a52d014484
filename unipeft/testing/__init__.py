"""Conformance kit (see unipeft.testing docs)."""
