"""COCO box evaluation of a checkpoint with its deformable RoI pooling changed at inference.

    python tools/probe_roi_pool.py checkpoint=PATH roi_pool_probe=mask_roi_mean
    python tools/probe_roi_pool.py checkpoint=PATH roi_pool_probe=no_offsets data=coco data.root=/data/coco

(or `detkit-probe-roi-pool ...`, `python -m detkit.study.cli.probe_roi_pool ...`). The eval
tool's work (tools/eval.py: the same keys, metrics.json and detections.json in its run folder,
default outputs/probe_roi_pool/<time>; log probe_roi_pool.log) with every `DeformRoIPool` of the
model changed as `roi_pool_probe=no_offsets|mask_roi_mean|mask_batch_mean` says
(`detkit.study.probes`); metrics.json names the probe. A model without deformable RoI pooling,
or a bin-weight probe of an unmodulated one, fails before any data is made.
Mistakes end with one line on stderr and exit status 2.
"""
from __future__ import annotations

from pathlib import Path

from detkit.cli import run_app  # torch comes later
from detkit.cli.eval import ModelChange, evaluate_checkpoint


def probe_change(probe: str):
    """The `change_model` of `detkit.cli.eval.evaluate_checkpoint` for `probe`."""
    from detkit.study.probes import probed_poolers, roi_pool_probe  # torch: after the command line is checked

    def change(model) -> ModelChange:
        probed_poolers(model, probe)  # a probe this model cannot take fails before any data is made
        what = "offsets set to 0" if probe == "no_offsets" else "bin weights averaged"
        return ModelChange(roi_pool_probe(model, probe), f"roi_pool_probe={probe}: the deformable RoI pooling's {what}",
                           {"roi_pool_probe": str(probe)})
    return change


def job(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    evaluate_checkpoint(cfg, Path(HydraConfig.get().runtime.output_dir), probe_change(str(cfg.roi_pool_probe)))


def main() -> None:
    run_app(job, "probe_roi_pool")


if __name__ == "__main__":
    main()
