"""Hybrid methods: gated compositions of deltas of other families."""

from . import unipelt

METHODS = (unipelt.METHOD,)
