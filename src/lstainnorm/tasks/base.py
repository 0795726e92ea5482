"""What a task (classification, segmentation) supplies to the shared Lightning module.

:class:`~lstainnorm.tasks.module.StainNormModule` owns the normalisation layer, the optimiser,
the schedules and the logging; a :class:`Task` owns everything that depends on the kind of
label: the network, the loss, inference, and the metrics. A new task kind implements this
protocol and adds itself to ``TASKS`` in :mod:`lstainnorm.tasks.module`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:  # typing only: the module imports the tasks, not the other way round
    import lightning as L

    from ..config import Config

__all__ = ["Task", "monitored_metric"]


class Task(Protocol):
    """The task-specific half of a run."""

    monitor: ClassVar[str]
    """The validation metric that picks the best checkpoint (higher is better)."""

    metrics: ClassVar[tuple[str, ...]]
    """Every metric the task logs (what ``trainer.monitor`` may name)."""

    def __init__(self, cfg: "Config", classes: list[str], centres: list[str]) -> None: ...

    def build_net(self) -> nn.Module:
        """The task network that follows the normalisation layer."""
        ...

    def target(self, batch: dict) -> torch.Tensor:
        """The batch's training target (labels or masks)."""
        ...

    def augment_pair(self, x: torch.Tensor, batch: dict, seed: int, epoch: int, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Geometric augmentation of images and targets together, reproducible from the seeds."""
        ...

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    def predict(self, model: nn.Module, x: torch.Tensor, tta: bool = True) -> torch.Tensor:
        """Inference output of ``model`` on a validation or test batch (e.g. sliding windows);
        ``tta=False``: without the config's test-time augmentation (the per-epoch validation)."""
        ...

    def update(self, out: torch.Tensor, batch: dict) -> None:
        """Accumulate validation metrics."""
        ...

    def compute(self) -> dict[str, float]:
        """The epoch's validation metrics (and reset them)."""
        ...

    def reset_collect(self) -> None: ...

    def collect(self, out: torch.Tensor, batch: dict) -> None:
        """Accumulate test outputs for per-centre metrics."""
        ...

    def finish_collect(self, module: "L.LightningModule") -> dict[str, Any]:
        """Test metrics, overall and per centre (gathered over DDP ranks)."""
        ...


def monitored_metric(cfg: "Config", task: type[Task] | Task) -> str:
    """The validation metric a run picks its best checkpoint by (``val/<name>``): ``trainer.monitor``,
    except that the schema's default (``val/acc``) follows the task (``val/dice`` for segmentation).
    What a run was trained for is what its evaluations under stress should report."""
    monitor = cfg.trainer.monitor
    return task.monitor if cfg.task != "classification" and monitor == "val/acc" else monitor
