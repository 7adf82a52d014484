"""The contract between unipeft and every method or structure map, built-in or third-party.

- :mod:`~unipeft.contract.deltas`: the root :class:`DeltaModule` and the five family bases;
- :mod:`~unipeft.contract.sites`: where a delta attaches (module and sequence sites);
- :mod:`~unipeft.contract.config`: :class:`DeltaConfig`, the base of every method's config;
- :mod:`~unipeft.contract.method`: :class:`Method`, the record a plugin registers;
- :mod:`~unipeft.contract.plan`: :class:`AdapterPlan`, an adapter ready to enter a model;
- :mod:`~unipeft.contract.fastpath`: the optional protocol of deltas with fused kernels;
- :mod:`~unipeft.contract.maps`: :class:`StructureMap` and :class:`LayoutMap`;
- :mod:`~unipeft.contract.hookspecs`: the pluggy hooks a plugin implements;
- :mod:`~unipeft.contract.errors`: the exceptions unipeft raises.

Nothing here imports the runtime, the features or any method: a plugin that depends on
this package alone depends on what is promised, not on how unipeft runs it.
"""
