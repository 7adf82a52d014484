"""Selective methods: chosen existing parameters of the backbone are tuned."""

from . import bitfit

METHODS = (bitfit.METHOD,)
