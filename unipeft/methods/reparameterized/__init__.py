"""Reparameterized methods: a weight change built from few parameters, mergeable."""

from . import dora, lora

METHODS = (lora.METHOD, dora.METHOD)
