"""Additive methods: new modules or soft tokens added to the backbone."""

from . import bottleneck_adapter, prompt_tuning

METHODS = (bottleneck_adapter.METHOD, prompt_tuning.METHOD)
