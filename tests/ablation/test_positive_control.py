"""The positive control (configs/ablation/positive_control.yaml): two experiments that differ
only in the deformable layers, trained from scratch, and a sweep that gives them no
pre-training; tools/ablate.py's data= and table options that it relies on."""
from __future__ import annotations

import pytest
import torch

from detkit.study.tables import load_table, paper_table_names
from detkit.config.compose import check_config
from detkit.study.cli.ablate import read_options
from detkit.config.build import build_model
from detkit.modeling.backbone.resnet import deformable_layers
from detkit.ops import DeformConv2d, DeformRoIPool


@pytest.mark.parametrize("data", ["synthetic", "synthetic_geometry"])
def test_control_pair_differs_only_in_the_deformable_layers(data):
    plain = check_config("train", ["experiment=control/plain", f"data={data}"])
    deformable = check_config("train", ["experiment=control/deformable", f"data={data}"])
    default = check_config("train", [f"data={data}"])
    assert deformable.model == default.model and deformable.schedule == default.schedule   # the default run
    assert plain.model.backbone.weights is None and deformable.model.backbone.weights is None   # from scratch
    assert plain.model.backbone.norm == "bn" and plain.model.backbone.freeze_at == 0
    assert plain.schedule == deformable.schedule
    differing = {k for k in plain.model if plain.model[k] != deformable.model[k]}
    assert differing == {"pooler_kind", "backbone"}
    assert {k for k in plain.model.backbone if plain.model.backbone[k] != deformable.model.backbone[k]} == {
        "deform_blocks"}

    torch.manual_seed(0)
    plain_model = build_model(plain.model, "plain")
    torch.manual_seed(0)
    deformable_model = build_model(deformable.model, "deformable")
    assert deformable_layers(plain_model.backbone) == []
    assert not any(isinstance(m, (DeformConv2d, DeformRoIPool)) for m in plain_model.modules())
    assert len(deformable_layers(deformable_model.backbone)) == 6     # R18: 2 blocks in each of res3-res5
    assert any(isinstance(m, DeformRoIPool) and m.modulated for m in deformable_model.modules())
    # Every plain parameter exists, with the same shape, in the deformable model (offset branches aside).
    plain_shapes = {k: v.shape for k, v in plain_model.state_dict().items()}
    deformable_shapes = {k: v.shape for k, v in deformable_model.state_dict().items() if ".offset_branch." not in k}
    assert plain_shapes == deformable_shapes


def test_control_table_trains_from_scratch_on_its_own():
    table = load_table("positive_control")
    assert table.from_scratch and table.baseline == "control/plain"
    assert "positive_control" not in paper_table_names()
    options = read_options(["table=positive_control", "data=synthetic_geometry"])
    assert options["pretrain"] is None                              # auto: no pre-training for it
    assert options["data"] == "synthetic_geometry" and str(options["out"]).endswith("synthetic_geometry")
    assert [t.name for t in read_options(["table=all"])["tables"]] == paper_table_names()
    with pytest.raises(ValueError, match="trains from scratch; pretrain=backbone_synthetic does not apply"):
        read_options(["table=positive_control", "pretrain=backbone_synthetic"])
    with pytest.raises(ValueError, match="run it in a sweep of its own"):
        read_options(["table=[positive_control,fpn_mmdet]"])


@pytest.mark.parametrize("data, pretrain", [("synthetic", "backbone_synthetic"),
                                            ("synthetic_geometry", None),
                                            ("coco", None)])
def test_ablate_takes_the_data_setting(data, pretrain):
    """data= is ablate's own key although configs/ holds the training tool's `data` group."""
    options = read_options(["table=fpn_mmdet", f"data={data}"])
    assert options["data"] == data and options["pretrain"] == pretrain
    assert str(options["out"]) == f"outputs/ablations/{data}"
    assert str(read_options(["table=fpn_mmdet", f"data={data}", "out=/x"])["out"]) == "/x"
