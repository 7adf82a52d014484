"""Batch norms keep their running statistics while adapters train.

A batch norm's running mean and variance are buffers of the backbone: in training mode
PyTorch overwrites them on every forward, so training an adapter would change the frozen
backbone, and neither a saved adapter nor :meth:`~unipeft.DeltaModel.unload` could give
back the model it was trained on. :class:`FrozenNormStatistics` (a base of
:class:`~unipeft.DeltaModel`) leaves every batch norm of the backbone in evaluation mode
when the model trains: it normalises with the statistics it was pretrained with, as the
frozen backbone should. Set ``model.update_norm_statistics = True`` to let them follow
the new data instead (they are then part of the backbone, not of the saved adapter).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def norms_with_statistics(module: nn.Module) -> list[nn.Module]:
    """The batch norms inside ``module`` that track running statistics."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


class FrozenNormStatistics:
    """``train()`` that keeps the backbone's batch norms in evaluation mode (see above)."""

    update_norm_statistics: bool = False

    def train(self, mode: bool = True) -> Any:
        super().train(mode)  # type: ignore[misc]
        if mode and not self.update_norm_statistics:
            for norm in norms_with_statistics(self.base_model):  # type: ignore[attr-defined]
                norm.eval()
        return self
