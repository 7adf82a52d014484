"""Mixture-of-experts methods: a router over expert deltas."""

from . import moe_lora

METHODS = (moe_lora.METHOD,)
