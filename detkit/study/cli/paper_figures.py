"""The DCNv1 paper's Figures 5 and 7 from a checkpoint and one image of a COCO-format dataset.

    python tools/paper_figures.py checkpoint=PATH                          # its dataset's val split
    python tools/paper_figures.py checkpoint=PATH data=synthetic_geometry image_index=12
    python tools/paper_figures.py checkpoint=PATH images=FOLDER annotations=instances.json

(or `detkit-paper-figures ...`, `python -m detkit.study.cli.paper_figures ...`). Writes, into
`output_dir` (default: the run folder, `hydra.run.dir`, default outputs/paper_figures/<time>):

- fig5_sampling.png: three panels, the 9**num_layers sampling points of `num_layers` stacked
  deformable convs (the network's last ones, or those of `stage`) for an activation unit on
  background, at the centre of a small object and at the centre of a large object (COCO's
  area buckets of the ground truth), on the image upscaled to a shorter side of at least
  `min_canvas` pixels (detkit/study/figures.py says how the units are chosen);
- fig7_roi_bins.png: one panel per top_k detection with its deformable RoI pooling bins; when
  the RoI pooler is not deformable (or nothing was detected) it is skipped with a log line;
- figures.json: the checkpoint, the data, the image (index, id, file), the layers followed,
  and per unit its centre (x, y, original pixels), bucket, object box and area, the number of
  points and their mean distance from the unit (original pixels; it grows with the object
  when the offsets adapt to it), and per RoI its box, score and mean bin shift.

Data (first that applies, as tools/analyze_offsets.py): `images` + `annotations`; `data=...`
(its `split`, default val); the data config stored in the checkpoint; the default synthetic
dataset. `image_index=null` takes the first of the first `max_images` images holding both a
small (area < 32^2) and a large (area >= 96^2) object. Mistakes (a checkpoint without
deformable convs, an image without a small or a large object, no such image among
max_images, a stage with fewer deformable convs than num_layers) end with one line on stderr
and exit status 2.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from detkit.cli import run_app

logger = logging.getLogger("detkit.paper_figures")


def _annotations(dataset, index: int) -> list[dict]:
    return dataset.coco.imgToAnns.get(dataset.ids[index], [])


def choose_image(dataset, source: str, image_index: int | None, max_images: int | None) -> int:
    """The dataset index of the image to draw: `image_index` (checked), or the first of the first
    `max_images` images whose ground truth holds a small and a large object."""
    from detkit.study.figures import ground_truth_boxes, has_small_and_large

    if len(dataset) == 0:
        raise ValueError(f"no images in {source}")
    if image_index is not None:
        if not 0 <= int(image_index) < len(dataset):
            raise ValueError(f"image_index {image_index} is out of range: {source} has {len(dataset)} images "
                             f"(0..{len(dataset) - 1})")
        return int(image_index)
    count = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    for index in range(count):
        info = dataset.image_info(index)
        _, areas = ground_truth_boxes(_annotations(dataset, index), (info["height"], info["width"]))
        if has_small_and_large(areas):
            return index
    raise ValueError(f"none of the first {count} images of {source} holds both a small (area < 32^2) and a large "
                     f"(area >= 96^2) ground-truth object; pass image_index=N or raise max_images")


def job(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from detkit.study.cli.analyze_offsets import open_dataset
    from detkit.engine.checkpoint import load_model
    from detkit.utils.comm import resolve_device
    from detkit.io import write_json
    from detkit.study.figures import ground_truth_boxes, paper_figures
    from detkit.vis import check_sampling_request, save_png

    if (cfg.images is None) != (cfg.annotations is None):
        raise ValueError("pass both images=FOLDER and annotations=JSON (or neither, to use a data config)")
    if cfg.max_images is not None and int(cfg.max_images) < 1:
        raise ValueError(f"max_images must be at least 1 (or null for all), got {cfg.max_images}")
    if int(cfg.min_canvas) < 1:
        raise ValueError(f"min_canvas must be at least 1 pixel, got {cfg.min_canvas}")
    if int(cfg.top_k) < 0:
        raise ValueError(f"top_k must be 0 or more, got {cfg.top_k}")
    if not float(cfg.point_radius) > 0 or not 0 < float(cfg.point_alpha) <= 1:
        raise ValueError(f"point_radius must be positive and point_alpha in (0, 1], got {cfg.point_radius} and "
                         f"{cfg.point_alpha}")
    if cfg.image_index is not None and int(cfg.image_index) < 0:
        raise ValueError(f"image_index must be 0 or more (or null), got {cfg.image_index}")
    model, checkpoint = load_model(cfg.checkpoint, resolve_device(cfg.device))
    try:
        check_sampling_request(model, cfg.stage, int(cfg.num_layers))
    except ValueError as exc:
        raise ValueError(f"{cfg.checkpoint}: {exc}") from None
    dataset, source = open_dataset(cfg, checkpoint)
    index = choose_image(dataset, source, cfg.image_index, cfg.max_images)
    info = dataset.image_info(index)
    boxes, areas = ground_truth_boxes(_annotations(dataset, index), (info["height"], info["width"]))
    image, _ = dataset[index]
    try:
        figures = paper_figures(model, image, boxes, areas, num_layers=int(cfg.num_layers), stage=cfg.stage,
                                top_k=int(cfg.top_k), min_canvas=int(cfg.min_canvas),
                                class_names=checkpoint.get("class_names"), point_radius=float(cfg.point_radius),
                                alpha=float(cfg.point_alpha))
    except ValueError as exc:
        raise ValueError(f"image {index} (id {info['id']}, {info['file_name']}) of {source}: {exc}") from None
    output_dir = Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
    fig5, fig7 = output_dir / "fig5_sampling.png", output_dir / "fig7_roi_bins.png"
    for path, picture in ((fig5, figures.fig5), (fig7, figures.fig7)):
        if picture is not None:
            save_png(path, picture)
        else:
            path.unlink(missing_ok=True)  # an earlier run's picture in the same folder would pass for this one's
    summary = figures.summary()
    payload = {"checkpoint": str(cfg.checkpoint), "data": source,
               "image": {"index": index, "id": int(info["id"]), "file_name": str(info["file_name"]),
                         "width": int(info["width"]), "height": int(info["height"])},
               "num_layers": int(cfg.num_layers), "stage": cfg.stage, "min_canvas": int(cfg.min_canvas),
               "fig5": None if figures.fig5 is None else str(fig5),
               "fig7": None if figures.fig7 is None else str(fig7), **summary}
    write_json(output_dir / "figures.json", payload, indent=2)  # atomic
    logger.info("image %d (id %s, %s) of %s; %s", index, info["id"], info["file_name"], source,
                f"{summary['num_points']} sampling points per unit through {', '.join(summary['layers'])}"
                if summary["layers"] else "deformable RoI pooling only")
    for unit in summary["units"]:
        logger.info("%-10s unit at (%.1f, %.1f): mean distance of its points %.1f px", unit["bucket"], unit["x"],
                    unit["y"], unit["mean_distance"])
    if figures.fig5 is None:
        logger.info("fig5 skipped: %s", figures.fig5_skipped)
    else:
        logger.info("-> %s", fig5)
    if figures.fig7 is None:
        logger.info("fig7 skipped: %s", figures.fig7_skipped)
    else:
        logger.info("-> %s", fig7)
    logger.info("-> %s", output_dir / "figures.json")


def main() -> None:
    run_app(job, "paper_figures")


if __name__ == "__main__":
    main()
