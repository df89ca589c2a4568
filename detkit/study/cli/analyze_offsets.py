"""Effective dilation of a checkpoint's deformable convs by object size (DCNv1 Table 2).

    python tools/analyze_offsets.py checkpoint=PATH                       # its dataset's val split
    python tools/analyze_offsets.py checkpoint=PATH data=coco data.root=/data/coco max_images=500
    python tools/analyze_offsets.py checkpoint=PATH images=FOLDER annotations=instances.json

(or `detkit-analyze-offsets ...`, `python -m detkit.study.cli.analyze_offsets ...`). For every
deformable conv layer: the effective dilation (mean distance between the sampling
locations of horizontally/vertically adjacent taps, in units of the layer's input grid; a
plain conv with dilation d gives d) over the activations whose centre lies on a small,
medium or large ground-truth box (COCO area thresholds 32^2 and 96^2 of the box in the
original image; the smallest box when several contain it) or on background: mean and
standard deviation, and the mean mask value for DCNv2 layers (see detkit/study/offset_stats.py).
Images are fed at their original size (the model's transform resizes them as in inference).

Data (first that applies): `images` + `annotations`; `data=...` (its `split`, default val);
the data config stored in the checkpoint; the default synthetic dataset. Prints the table
and writes offset_stats.json (and offset_stats.md, the table as Markdown) into the run folder (`hydra.run.dir`, default
outputs/analyze_offsets/<time>) or to `output`. Mistakes end with one line on stderr and
exit status 2.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detkit.cli import run_app
from detkit.data.coco import CocoDetection
from detkit.engine.checkpoint import load_model
from detkit.utils.comm import resolve_device
from detkit.io import write_json, write_text
from detkit.study.offset_stats import OffsetStatistics, table2_markdown
from detkit.vis import capture
from detkit.vis.sampling import deformable_conv_names


def open_dataset(cfg: DictConfig, checkpoint: dict) -> tuple[CocoDetection, str]:
    """The COCO-format dataset to analyse (original images, no transforms) and where it came from."""
    if cfg.images is not None:
        return CocoDetection(cfg.images, cfg.annotations), f"images={cfg.images} annotations={cfg.annotations}"
    from detkit.config.build import build_data_source, data_config_for_checkpoint

    data_cfg, source = data_config_for_checkpoint(cfg.get("data"), checkpoint)
    data_source = build_data_source(data_cfg)
    data_source.prepare()
    image_dir, annotation_file = data_source.split_paths(str(cfg.split))
    return CocoDetection(image_dir, annotation_file), f"{source}, {cfg.split} split ({annotation_file})"


def job(cfg: DictConfig) -> None:
    if (cfg.images is None) != (cfg.annotations is None):
        raise ValueError("pass both images=FOLDER and annotations=JSON (or neither, to use a data config)")
    if cfg.max_images is not None and int(cfg.max_images) < 1:
        raise ValueError(f"max_images must be at least 1 (or null for all), got {cfg.max_images}")
    model, checkpoint = load_model(cfg.checkpoint, resolve_device(cfg.device))
    if not deformable_conv_names(model):
        raise ValueError(f"{cfg.checkpoint} has no deformable conv layers: there is no effective dilation to "
                         f"measure")
    dataset, source = open_dataset(cfg, checkpoint)
    count = len(dataset) if cfg.max_images is None else min(len(dataset), int(cfg.max_images))
    if count == 0:
        raise ValueError(f"no images in {source}")
    stats = OffsetStatistics()
    for index in range(count):
        image, target = dataset[index]
        result = capture(model, image, top_k=0)
        stats.update(result.layers, target["boxes"].numpy())
    table = stats.table()
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir) / "offset_stats.json"
    payload = {"checkpoint": str(cfg.checkpoint), "data": source, **stats.result()}
    write_json(output, payload, indent=2)  # atomic
    markdown = output.with_suffix(".md")
    write_text(markdown, table2_markdown(stats.result(), title=f"`{cfg.checkpoint}` on {count} images of {source}") + "\n")
    print(f"{cfg.checkpoint} on {count} images of {source}")
    print(table)
    print(f"-> {output}, {markdown}")


def main() -> None:
    run_app(job, "analyze_offsets")


if __name__ == "__main__":
    main()
