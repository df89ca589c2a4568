"""Data: COCO-format datasets, the synthetic shapes dataset, transforms and loaders.

- `synthetic`: generates (and caches) detkit's default dataset of shapes.
- `coco`: `CocoDetection` (pycocotools + OpenCV) and `DatasetError`.
- `transforms`: resize / flip / to-tensor on numpy images in the loader workers.
- `loader`: collate, aspect-ratio grouping, endless seeded training stream, test sharding.
- `sources`: what a `data` config node builds (`SyntheticShapes`, `CocoFolder`).
"""
from detkit.data.coco import CocoDetection, DatasetError, coco_paths, load_coco_json
from detkit.data.loader import (
    AspectRatioGroupedBatchSampler,
    InferenceSampler,
    InfiniteSampler,
    aspect_ratio_groups,
    build_test_loader,
    build_train_loader,
    collate_detection,
    targets_to_device,
)
from detkit.data.synthetic import (
    GENERATOR_VERSION,
    SYNTHETIC_CLASSES,
    SyntheticConfig,
    default_synthetic_root,
    ensure_synthetic_dataset,
    generate_synthetic_coco,
    render_synthetic_image,
    synthetic_paths,
)
from detkit.data.sources import CocoFolder, DataSource, SyntheticShapes
from detkit.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortestSide,
    ToTensor,
    build_transforms,
)

__all__ = [
    "CocoDetection", "DatasetError", "coco_paths", "load_coco_json",
    "AspectRatioGroupedBatchSampler", "InferenceSampler", "InfiniteSampler", "aspect_ratio_groups",
    "build_test_loader", "build_train_loader", "collate_detection", "targets_to_device",
    "GENERATOR_VERSION", "SYNTHETIC_CLASSES", "SyntheticConfig", "default_synthetic_root",
    "ensure_synthetic_dataset", "generate_synthetic_coco", "render_synthetic_image", "synthetic_paths",
    "Compose", "RandomHorizontalFlip", "ResizeShortestSide", "ToTensor", "build_transforms",
    "CocoFolder", "DataSource", "SyntheticShapes",
]
