"""A training hook drawing where the deformable layers sample (TensorBoard images).

    train(cfg, run_dir, extra_hooks=sampling_picture_hooks)     # tools/train.py

After each evaluation of the training loop (`detkit.engine.hooks.EvalHook`; this hook
goes after it in the hook list), `SamplingPictures` draws `sampling_figure` on the first
`count` images of the val set and logs them as images "sampling/val_<i>" at the
evaluation's iteration.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from torch import nn

from detkit.engine.hooks import TrainingRun
from detkit.engine.loop import Hook, LoopState
from detkit.vis.draw import sampling_figure
from detkit.vis.sampling import deformable_conv_names

__all__ = ["SamplingPictures", "sampling_picture_hooks"]

logger = logging.getLogger("detkit.train")  # its lines belong to the training log


class SamplingPictures(Hook):
    """After each evaluation that produced metrics (rank 0), the sampling pictures of val
    images 0..count-1 (`sampling_figure`: HxWx3 uint8 RGB of the image's size, the model's
    train/eval mode kept) through `add_image(tag, picture, iteration)`, e.g. a bound
    `lambda tag, picture, step: writer.add_image(tag, picture, step, dataformats="HWC")`.
    Nothing when count <= 0 or the model has no deformable convolution; a warning and no
    more pictures of that evaluation when `sampling_figure` refuses the model (ValueError)."""

    def __init__(self, add_image: Callable[[str, np.ndarray, int], Any], model: nn.Module, val_set: Any,
                 class_names: Mapping[int, str] | None, count: int) -> None:
        self.add_image, self.model, self.val_set = add_image, model, val_set
        self.class_names, self.count = class_names, int(count)
        self._seen = 0  # state.evaluations already handled

    def after_step(self, state: LoopState) -> None:
        self._after_evaluation(state)

    def after_train(self, state: LoopState) -> None:
        self._after_evaluation(state)

    def _after_evaluation(self, state: LoopState) -> None:
        if state.evaluations == self._seen:
            return
        self._seen = state.evaluations
        if state.metrics is not None:
            self.draw(state.evaluated_at)

    def draw(self, iteration: int) -> None:
        count = min(self.count, len(self.val_set))
        if count <= 0 or not deformable_conv_names(self.model):
            return
        for index in range(count):
            image, _ = self.val_set[index]
            try:
                picture = sampling_figure(self.model, image, class_names=self.class_names)
            except ValueError as exc:  # e.g. fewer stacked deformable layers than drawn
                logger.warning("no sampling picture: %s", exc)
                return
            self.add_image(f"sampling/val_{index}", picture, iteration)


def sampling_picture_hooks(config: Mapping[str, Any], run: TrainingRun) -> list[Hook]:
    """The extra hooks of `train(cfg, run_dir, extra_hooks=sampling_picture_hooks)`, given the
    run's config as plain data: a `SamplingPictures` of its tensorboard_sampling_images val
    images written to rank 0's TensorBoard writer (none on other ranks)."""
    writer = run.writer
    if writer is None:
        return []

    def add_image(tag: str, picture: np.ndarray, iteration: int) -> None:
        writer.add_image(tag, picture, iteration, dataformats="HWC")

    return [SamplingPictures(add_image, run.model, run.val_set, run.class_names,
                             int(config["tensorboard_sampling_images"]))]
