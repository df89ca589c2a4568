"""Data: COCO-format datasets, the synthetic shapes dataset, transforms and loaders.

- `synthetic`: generates (and caches) detkit's default dataset of shapes;
  `synthetic_config`: its options (`SyntheticConfig`, also the schema of a data config's
  `generator` node).
- `coco`: `CocoDetection` (pycocotools + OpenCV) and `DatasetError`.
- `transforms`: resize / flip / to-tensor on numpy images in the loader workers.
- `loader`: collate, aspect-ratio grouping, endless seeded training stream, test sharding.
- `sources`: what a `data` config node builds (`SyntheticShapes`, `CocoFolder`).

Import from the modules (`from detkit.data.coco import CocoDetection`): this package face
imports none of them, so that `detkit.data.synthetic_config` (and with it
`detkit.config.schemas`) loads without torch.
"""
