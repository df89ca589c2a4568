"""Every ablation experiment composes, for the synthetic and the COCO setting, into the
detector and schedule its table row describes, and builds."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from detkit.study.tables import load_table, paper_table_names, table_names
from detkit.config.compose import CONFIG_DIR, check_config
from detkit.study.cli.ablate import read_options
from detkit.config.build import build_model
from detkit.modeling.backbone.resnet import deformable_layers
from detkit.ops import DCNv3, DCNv4, DeformConv2d, OffsetSampling

ROW_FAMILIES = ("dcnv1", "dcnv2", "fpn")      # configs/experiment/<family>/: the tables' rows
EXPERIMENTS = sorted(str(p.relative_to(CONFIG_DIR / "experiment").with_suffix(""))
                     for family in ROW_FAMILIES for p in (CONFIG_DIR / "experiment" / family).glob("*.yaml"))

# experiment -> (deformable 3x3 layers per stage, deform_kind, pooler kind) in a ResNet-34/50/101
RES3, RES4 = 4, 6           # blocks of R34's / R50's res3 / res4 (R101: res4 has 23)
EXPECTED = {
    "dcnv1/baseline": ({}, "dcnv1", "alignv2"),
    "dcnv1/res5c": ({"res5": 1}, "dcnv1", "alignv2"),
    "dcnv1/res5bc": ({"res5": 2}, "dcnv1", "alignv2"),
    "dcnv1/res5abc": ({"res5": 3}, "dcnv1", "alignv2"),
    "dcnv1/res5abc_res4": ({"res4": 3, "res5": 3}, "dcnv1", "alignv2"),
    "dcnv1/dpool": ({}, "dcnv1", "deform"),
    "dcnv1/res5abc_dpool": ({"res5": 3}, "dcnv1", "deform"),
    "dcnv2/regular": ({}, "dcnv1", "alignv2"),
    "dcnv2/dconv_c5_dpool": ({"res5": 3}, "dcnv1", "deform"),
    "dcnv2/dconv_c4_c5_dpool": ({"res4": RES4, "res5": 3}, "dcnv1", "deform"),
    "dcnv2/dconv_c3_c5_dpool": ({"res3": RES3, "res4": RES4, "res5": 3}, "dcnv1", "deform"),
    "dcnv2/mdconv_c3_c5_mdpool": ({"res3": RES3, "res4": RES4, "res5": 3}, "dcnv2", "mdeform"),
    "fpn/baseline": ({}, "dcnv1", "alignv2"),
    "fpn/dconv_c3_c5": ({"res3": RES3, "res4": RES4, "res5": 3}, "dcnv1", "alignv2"),
    "fpn/mdconv_c3_c5": ({"res3": RES3, "res4": RES4, "res5": 3}, "dcnv2", "alignv2"),
    "fpn/dpool": ({}, "dcnv1", "deform"),
    "fpn/mdpool": ({}, "dcnv1", "mdeform"),
    "fpn/dcnv3_c3_c5": ({"res3": RES3, "res4": RES4, "res5": 3}, "dcnv3", "alignv2"),
    "fpn/dcnv4_c3_c5": ({"res3": RES3, "res4": RES4, "res5": 3}, "dcnv4", "alignv2"),
    "fpn/offset_sampling_c3_c5": ({"res3": RES3, "res4": RES4, "res5": 3}, "offset_sampling", "alignv2"),
}
# family -> (layout, lr_mult deform_conv, lr_mult deform_roi_pool): as each paper trains them
FAMILY = {"dcnv1": ("single_scale", 1.0, 0.01), "dcnv2": ("single_scale", 0.1, 0.1), "fpn": ("fpn", 1.0, 1.0)}
COCO = ["data=coco", "data.root=/data/coco"]


def compose(experiment: str, *overrides: str):
    return check_config("train", [f"experiment={experiment}", *overrides])


def test_every_experiment_is_in_a_table_and_every_row_exists():
    in_tables = {e for name in paper_table_names() for e in load_table(name).experiments}
    assert set(EXPERIMENTS) == in_tables == set(EXPECTED)
    assert set(paper_table_names()) == {"dcnv1_table1", "dcnv1_table3", "dcnv2_table1", "fpn_mmdet",
                                        "dcn_generations"}
    assert set(table_names()) == set(paper_table_names()) | {"positive_control"}


def test_tables_have_the_papers_rows():
    assert len(load_table("dcnv1_table1").rows) == 5
    assert len(load_table("dcnv1_table3").rows) == 4
    assert len(load_table("dcnv2_table1").rows) == 5
    assert len(load_table("fpn_mmdet").rows) == 5
    assert [r.experiment for r in load_table("dcn_generations").rows] == [
        "fpn/baseline", "fpn/dconv_c3_c5", "fpn/mdconv_c3_c5", "fpn/dcnv3_c3_c5", "fpn/dcnv4_c3_c5",
        "fpn/offset_sampling_c3_c5"]
    # The paper's own numbers travel with the rows (DCNv2 Table 1, Faster R-CNN: 34.7 -> 41.7).
    rows = {r.experiment: r.paper for r in load_table("dcnv2_table1").rows}
    assert rows["dcnv2/regular"] == (34.7,) and rows["dcnv2/mdconv_c3_c5_mdpool"] == (41.7,)
    assert rows["dcnv2/dconv_c4_c5_dpool"] == (None,)
    # The papers' detectors: single-scale for DCNv1/DCNv2, FPN for mmdetection's rows; the
    # data=coco rows use the same (check_model below), the CPU proxy may not.
    assert [load_table(t).paper_layout for t in ("dcnv1_table1", "dcnv1_table3", "dcnv2_table1", "fpn_mmdet")] == \
        ["single_scale", "single_scale", "single_scale", "fpn"]


def test_a_table_with_an_unknown_paper_layout_is_refused(tmp_path):
    text = (CONFIG_DIR / "ablation" / "fpn_mmdet.yaml").read_text().replace("layout: fpn", "layout: pyramid")
    (tmp_path / "odd.yaml").write_text(text)
    with pytest.raises(ValueError, match="paper.layout must be one of"):
        load_table("odd", tmp_path)


def check_model(cfg, experiment: str, depth: int, lr_mult: tuple[float, float] | None = None,
                layout: str | None = None) -> None:
    """`lr_mult`: the expected (deform_conv, deform_roi_pool) multipliers, `layout` the
    expected layout; None: the family's."""
    stages, kind, pooler = EXPECTED[experiment]
    family_layout, conv_mult, pool_mult = FAMILY[experiment.split("/")[0]]
    layout = layout or family_layout
    if lr_mult is not None:
        conv_mult, pool_mult = lr_mult
    assert cfg.model.layout == layout and cfg.model.pooler_kind == pooler
    assert cfg.model.backbone.depth == depth
    assert (cfg.schedule.lr_mult.deform_conv, cfg.schedule.lr_mult.deform_roi_pool) == (conv_mult, pool_mult)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    layers = deformable_layers(model.backbone)
    found: dict[str, int] = {}
    for name, _ in layers:
        stage = f"res{int(name.split('.')[0].removeprefix('layer')) + 1}"
        found[stage] = found.get(stage, 0) + 1
    assert found == stages
    assert cfg.model.backbone.deform_kind == kind
    layer_type = {"dcnv1": DeformConv2d, "dcnv2": DeformConv2d, "dcnv3": DCNv3, "dcnv4": DCNv4,
                  "offset_sampling": OffsetSampling}[kind]
    assert all(type(layer) is layer_type for _, layer in layers)
    assert all(layer.modulated == (kind == "dcnv2") for _, layer in layers if isinstance(layer, DeformConv2d))
    if kind in ("dcnv3", "dcnv4"):  # InternImage-T's grouping: 4 / 8 / 16 groups in res3 / res4 / res5
        groups = {f"res{int(n.split('.')[0].removeprefix('layer')) + 1}": layer.group for n, layer in layers}
        assert groups == {"res3": 4, "res4": 8, "res5": 16}
    # The deformable layers are the LAST blocks of their stage (DCNv1 Table 1: res5c, res5b-c, ...).
    blocks = {"res3": 4, "res4": 23 if depth == 101 else 6, "res5": 3}
    for stage, count in stages.items():
        index = {int(n.split(".")[1]) for n, _ in layers if n.startswith(f"layer{int(stage[3]) - 1}.")}
        assert index == set(range(blocks[stage] - count, blocks[stage]))


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_synthetic_experiment_composes_and_builds(experiment):
    cfg = compose(experiment)
    assert cfg.data.kind == "synthetic"
    assert cfg.schedule.max_iters == 300 and cfg.schedule.batch_size == 4     # schedule/ablation_cpu
    # Half-width ResNet-34 (ResNet-50's block counts), fine-tuned as the papers do: frozen BN,
    # stem and res2 frozen, weights from the pre-training that tools/ablate.py passes.
    backbone = cfg.model.backbone
    assert (backbone.depth, backbone.width, backbone.norm, backbone.freeze_at) == (34, 32, "frozen_bn", 2)
    assert not backbone.weights
    check_model(cfg, experiment, depth=34)


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_coco_experiment_has_the_papers_setting(experiment):
    family = experiment.split("/")[0]
    cfg = compose(experiment, *COCO, "model.backbone.weights=/w/resnet.pth")
    assert cfg.data.kind == "coco"
    depth = 101 if family == "dcnv1" else 50
    assert cfg.model.backbone.get("width", 64) == 64 and cfg.model.backbone.norm == "frozen_bn"
    expected_schedule = {"dcnv1": (240000, 8, 0.001), "dcnv2": (117266, 16, 0.02), "fpn": (90000, 16, 0.02)}
    assert (cfg.schedule.max_iters, cfg.schedule.batch_size, cfg.schedule.base_lr) == expected_schedule[family]
    assert cfg.model.transform_options.min_size == {"dcnv1": 600, "dcnv2": 1000, "fpn": 800}[family]
    if family != "fpn":
        assert cfg.model.backbone.dilate_res5 and cfg.model.rpn_feature == "res4"
    cfg.model.backbone.weights = None     # building only: no ImageNet file here
    check_model(cfg, experiment, depth=depth)


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_synthetic_geometry_experiment_trains_from_scratch_at_the_data_resize(experiment):
    """data=synthetic_geometry rows: every family on the R34 half-width FPN layout (the
    single-scale one learns too slowly from scratch here), trained from scratch (trainable BN,
    nothing frozen, no weights), every family's offsets at 0.1x, the model's resize the
    data's own (nothing resized twice)."""
    cfg = compose(experiment, "data=synthetic_geometry")
    assert cfg.data.root.endswith("synthetic_geometry") and cfg.data.generator.size_distribution == "log"
    backbone = cfg.model.backbone
    assert (backbone.depth, backbone.width, backbone.norm, backbone.freeze_at) == (34, 32, "bn", 0)
    assert not backbone.weights
    transform = cfg.model.transform_options
    assert (transform.min_size, transform.max_size) == (cfg.data.min_size, cfg.data.max_size) == (192, 320)
    schedule = cfg.schedule
    assert schedule.warmup_iters < schedule.steps[0] < schedule.steps[-1] < schedule.max_iters
    check_model(cfg, experiment, depth=34, lr_mult=(0.1, 0.1), layout="fpn")


def test_synthetic_geometry_sweep_has_no_pretraining():
    """pretrain=auto gives the data=synthetic_geometry sweep no pre-training (its rows train
    from scratch), and a run of every family composes with the same schedule."""
    from detkit.study.cli.ablate import AUTO_PRETRAIN

    assert "synthetic_geometry" not in AUTO_PRETRAIN
    assert read_options(["table=all", "data=synthetic_geometry"])["pretrain"] is None
    schedules = {f: compose(f"{f}/baseline" if f != "dcnv2" else "dcnv2/regular", "data=synthetic_geometry").schedule
                 for f in FAMILY}
    assert schedules["dcnv1"] == schedules["dcnv2"] == schedules["fpn"]


def test_coco_experiment_without_imagenet_weights_is_refused():
    from detkit.config.schemas import check_train_config

    cfg = compose("dcnv2/regular", *COCO)
    with pytest.raises(ValueError, match=r"model.backbone.weights is null.*resnet50.pth"):
        check_train_config(cfg, world_size=1)
    check_train_config(compose("dcnv2/regular", *COCO, "model.backbone.weights=/w/r50.pth"), world_size=1)


def test_unknown_data_setting_names_the_missing_config():
    with pytest.raises(ValueError, match=r"Could not find 'data/nonexistent'.*coco synthetic"):
        compose("dcnv1/res5c", "data=nonexistent")


@pytest.mark.parametrize("data, expected", [
    # Each group in the order the rows first appear in table=all (dcn_generations comes first).
    ("synthetic_geometry", [["fpn/baseline", "dcnv1/baseline", "dcnv2/regular"], ["dcnv1/dpool", "fpn/dpool"],
                            ["dcnv1/res5abc_dpool", "dcnv2/dconv_c5_dpool"]]),
    ("synthetic", []),          # the families' own layouts and offset multipliers differ there
])
def test_rows_with_identical_training_configs(data, expected, tmp_path):
    """The rows the sweep trains once (tools/ablate.py `same_runs`): only where every key of
    the composed training config is equal."""
    from detkit.study.cli.ablate import plan, same_runs, train_configs

    specs, _ = plan(read_options(["table=all", f"data={data}", "seeds=[0]", "pretrain=null", f"out={tmp_path}"]), [])
    assert same_runs(train_configs(specs, [0])) == expected
