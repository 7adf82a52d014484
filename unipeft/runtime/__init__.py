"""How adapters run: the plugin registry, target resolution, the hosts that run deltas inside
a backbone (module outputs, ``nn.MultiheadAttention``, token sequences) and the merge ledger.

Nothing here is needed to write a method or a structure map; :class:`unipeft.DeltaModel`
drives these pieces.
"""
