"""Where the trainable parameters should go, and what a trained update looks like.

- :func:`score_sites`: per-site sensitivity scores on calibration batches (first-order
  rank-``r`` loss change, Fisher trace, gradient norm; :mod:`.sensitivity` has the
  formulas), and ``probe``, a score past initialisation (:mod:`.probe`);
- :func:`place`: a method's sites (or whole roles) under a parameter budget, as role targets for
  ``unipeft.apply``; :class:`Auto`, the same inside ``unipeft.apply`` (``targets=Auto(...)``);
- :func:`effective_rank`, :func:`subspace_overlap`, :func:`adapter_spectra`: the spectrum of
  a trained adapter's ``ΔW`` per site.

docs/analysis.md shows them on the demo's text task.
"""

from .placement import BY, Auto, Placement, place
from .sensitivity import SCORES, SiteScore, score_sites, scores_table, unscorable
from .spectrum import adapter_spectra, effective_rank, singular_values, subspace_overlap

__all__ = [
    "BY",
    "SCORES",
    "Auto",
    "Placement",
    "SiteScore",
    "adapter_spectra",
    "effective_rank",
    "place",
    "score_sites",
    "scores_table",
    "singular_values",
    "subspace_overlap",
    "unscorable",
]
