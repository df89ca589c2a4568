"""Draw where a checkpoint's deformable layers sample on an image (DCNv1 Figures 5 and 7).

    python tools/visualize.py checkpoint=PATH input=IMAGE output=OUT.png
    python tools/visualize.py checkpoint=PATH input=IMAGE point=[120,80] stage=res5 num_layers=3

(or `detkit-visualize ...`, `python -m detkit.cli.visualize ...`). Writes one PNG of the
image's size: the top_k detections; the sampling points of the
activation unit at `point` (x, y in the image's pixels) through `num_layers` stacked
deformable convs, 9 (red) -> 81 (green) -> 729 (blue), or, without a point, of the units at
the centres of the top_k detections, all in the same picture; and, when the RoI pooler is
deformable, each top detection's bins (regular grid faint, shifted bins as small rectangles,
opacity following the DCNv2 mask). A Hydra app (configs/visualize.yaml); `hydra.run.dir=DIR`
sets its run folder. Mistakes (a checkpoint without deformable layers, a point outside the
image, an unreadable image, a stage with fewer deformable convs than num_layers) end with
one line on stderr and exit status 2.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from detkit.cli import run_app
from detkit.engine.checkpoint import load_model
from detkit.utils.comm import resolve_device
from detkit.evaluation.inference import read_image
from detkit.vis import check_sampling_request, has_deformable_pooling, sampling_figure, save_png


def parse_point(point) -> tuple[float, float] | None:
    if point is None:
        return None
    if not isinstance(point, (list, tuple, ListConfig)) or len(point) != 2:
        raise ValueError(f"point must be [x, y] in image pixels, got {point!r}")
    try:
        return float(point[0]), float(point[1])
    except (TypeError, ValueError):
        raise ValueError(f"point must be [x, y] numbers, got {list(point)!r}") from None


def job(cfg: DictConfig) -> None:
    point = parse_point(cfg.point)
    if not Path(cfg.input).is_file():
        raise ValueError(f"input {cfg.input} is not an image file")
    image = read_image(cfg.input)
    height, width = image.shape[1:]
    if point is not None and not (0 <= point[0] < width and 0 <= point[1] < height):
        raise ValueError(f"point ({point[0]:g}, {point[1]:g}) is outside the image {cfg.input} ({width}x{height} "
                         f"pixels: x in [0, {width}), y in [0, {height}))")
    model, checkpoint = load_model(cfg.checkpoint, resolve_device(cfg.device))
    try:
        used = check_sampling_request(model, cfg.stage, int(cfg.num_layers))
    except ValueError as exc:
        raise ValueError(f"{cfg.checkpoint}: {exc}") from None
    figure = sampling_figure(model, image, point=point, num_layers=int(cfg.num_layers), stage=cfg.stage,
                             top_k=int(cfg.top_k), class_names=checkpoint.get("class_names"),
                             offset_group=int(cfg.offset_group))
    save_png(cfg.output, figure)
    what = [f"sampling points through {used} deformable conv layers"] if used else []
    if has_deformable_pooling(model):
        what.append("deformable RoI bins")
    print(f"{' and '.join(what)} of {cfg.input} -> {cfg.output}")


def main() -> None:
    run_app(job, "visualize")


if __name__ == "__main__":
    main()
