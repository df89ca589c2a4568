"""detkit without its compiled ops: the build decision (DETKIT_BUILD_EXT, no C++ compiler), a
process where the extension cannot load, training and ONNX export on the forced fallback, and
a wheel built without the extension, installed into a fresh folder, training experiment=smoke.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import onnx
import pytest
import torch

from detkit import _build
from detkit._build import BuildConfigError, ExtensionFacts, decide_extension
from detkit.ops import _dispatch

REPO = Path(__file__).resolve().parents[2]
BUILD_COMMAND = "pip install --no-build-isolation -e ."

#: Run first in a child: makes `from detkit import _C` fail (a missing extension), and drops
#: an editable install's import hook, so that a PYTHONPATH folder supplies all of detkit.
NO_EXTENSION = textwrap.dedent("""
    import sys
    sys.modules["detkit._C"] = None
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    """)


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DETKIT_OPS", "DETKIT_BUILD_EXT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(changes)
    return env


def _python(code: str, cwd: Path = REPO, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- the build decision

def test_switch_zero_installs_without_the_extension():
    decision = decide_extension(ExtensionFacts(switch="0", compiler="/usr/bin/c++"))
    assert not decision.build
    assert decision.line() == (
        "detkit: installing without the compiled ops (DETKIT_BUILD_EXT=0): they run on the pure-PyTorch "
        "path, slower (docs/benchmarks.md); install a C++ compiler and reinstall to build them")


def test_no_compiler_installs_without_the_extension_unless_forced():
    decision = decide_extension(ExtensionFacts(switch="", compiler=None))
    assert not decision.build and "no C++ compiler found" in decision.line()
    with pytest.raises(BuildConfigError, match=r"DETKIT_BUILD_EXT=1, but no C\+\+ compiler was found"):
        decide_extension(ExtensionFacts(switch="1", compiler=None))
    with pytest.raises(BuildConfigError, match=r"DETKIT_BUILD_EXT must be 0, 1 or unset, got 'no'"):
        decide_extension(ExtensionFacts(switch="no", compiler="/usr/bin/c++"))


def test_compiler_builds_the_extension():
    for switch in ("", "1"):
        decision = decide_extension(ExtensionFacts(switch=switch, compiler="/usr/bin/g++"))
        assert decision.build and decision.line() == "detkit: building the compiled ops: C++ compiler /usr/bin/g++"


def test_find_cxx_compiler(tmp_path):
    assert _build.find_cxx_compiler({"PATH": str(tmp_path)}) is None
    fake = tmp_path / ("g++" if sys.platform != "win32" else "cl.exe")
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert _build.find_cxx_compiler({"PATH": str(tmp_path)}) == str(fake)
    assert _build.find_cxx_compiler({"PATH": str(tmp_path), "CXX": "absent-compiler -O2"}) is None
    assert _build.find_cxx_compiler({"PATH": str(tmp_path), "CXX": f"{fake} -O2"}) == str(fake)


def test_build_script_prints_one_line_without_compiler():
    """What tools/setup_env.sh shows before pip: one line, and no CUDA decision after it."""
    result = subprocess.run([sys.executable, str(REPO / "detkit" / "_build.py")], capture_output=True,
                            text=True, timeout=120, env=_env(PATH=os.path.dirname(sys.executable), CXX=""))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("detkit: installing without the compiled ops (no C++ compiler")


# ---------------------------------------------------------------- a process without the extension

#: dcnv3_core / dcnv4_core geometry in the process without the extension: 3x3, stride 1,
#: padding 1, dilation 1, 2 groups of 5 channels, offset_scale 1.5, remove_center.
DCN_ARGS = (3, 3, 1, 1, 1, 1, 1, 1, 2, 5, 1.5, True)
DCN_OP_ARGS = ([3, 3], [1, 1], [1, 1], [1, 1], 2, 5, 1.5, True)


def _dcn_tensors() -> dict[str, torch.Tensor]:
    """input, offset, mask and DCNv4's offset_mask (the same offsets and weights, packed)."""
    from tests.helpers import generator, normal, uniform

    gen = generator(6)
    gk = 2 * 8
    offset = normal((2, 6, 7, 2 * gk), gen, std=2.0, dtype=torch.float32)
    mask = uniform((2, 6, 7, gk), gen, -0.5, 1.0, dtype=torch.float32)
    packed = torch.cat([offset.unflatten(-1, (2, 16)), mask.unflatten(-1, (2, 8))], -1).flatten(-2)
    return {"input": normal((2, 6, 7, 10), gen, dtype=torch.float32), "offset": offset, "mask": mask,
            "offset_mask": torch.cat([packed, torch.zeros(2, 6, 7, 48 - 3 * gk)], -1)}


def test_ops_without_the_extension(tmp_path):
    """The ops (deform_conv2d, deform_roi_pool, dcnv3_core, dcnv4_core) run (on the pure path,
    warning once), are defined as torch.ops.detkit.* with the kernels' schemas, pass opcheck,
    and export to the same ONNX as with the kernels, which onnxruntime runs to the op's values."""
    code = NO_EXTENSION + textwrap.dedent(f"""
        import io, json, warnings
        import torch, onnx, onnxruntime as ort
        import detkit.ops as ops
        from detkit.ops import _extension, DeformConv2d, DeformRoIPool
        from detkit.ops.onnx import custom_translation_table, register_symbolics
        from tests.helpers import generator, normal, uniform
        from tests.install.test_no_extension import DCN_ARGS, DCN_OP_ARGS, _dcn_tensors
        report = {{"loaded": _extension.LOADED, "path": ops.ops_path("cpu")}}
        try:
            ops.require_ops()
        except RuntimeError as exc:
            report["require_ops"] = str(exc)
        report["schemas"] = {{n: str(getattr(torch.ops.detkit, n).default._schema)
                              for n in ("deform_conv2d", "deform_roi_pool", "dcnv3_core", "dcnv4_core")}}

        gen = generator(5)
        x = normal((2, 4, 9, 8), gen, dtype=torch.float32)
        offset = normal((2, 2 * 2 * 9, 9, 8), gen, std=2.0, dtype=torch.float32)
        weight = normal((6, 2, 3, 3), gen, dtype=torch.float32)
        mask = uniform((2, 2 * 9, 9, 8), gen, 0, 1, dtype=torch.float32)
        rois = torch.tensor([[0, 1.0, 2.0, 12.0, 14.0], [1, -3.0, 0.5, 9.0, 7.0]])
        roi_offset = uniform((2, 2, 3, 3), gen, dtype=torch.float32)
        roi_mask = uniform((2, 1, 3, 3), gen, 0, 1, dtype=torch.float32)
        dcn = _dcn_tensors()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            conv = ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)
            pool = ops.deform_roi_pool(x, rois, roi_offset, roi_mask, 3, 0.5, 2)
            ops.deform_conv2d(x, offset, weight, padding=1, mask=mask)
            v3 = ops.dcnv3_core(dcn["input"], dcn["offset"], dcn["mask"], *DCN_ARGS)
            v4 = ops.dcnv4_core(dcn["input"], dcn["offset_mask"], *DCN_ARGS)
        report["warnings"] = [str(w.message) for w in caught if w.category is ops.PureOpsWarning]
        torch.save({{"conv": conv, "pool": pool, "v3": v3, "v4": v4}}, {str(tmp_path / "outputs.pt")!r})

        # The ops themselves: opcheck (schema, autograd, fake kernel, aot dispatch).
        d = lambda t: t.double().requires_grad_(True)
        torch.library.opcheck(torch.ops.detkit.deform_conv2d.default,
                              (d(x), d(offset), d(weight), d(mask), None, [1, 1], [1, 1], [1, 1]))
        torch.library.opcheck(torch.ops.detkit.deform_roi_pool.default,
                              (d(x), rois.double(), d(roi_offset), d(roi_mask), 3, 3, 0.5, 2, 0.1))
        torch.library.opcheck(torch.ops.detkit.dcnv3_core.default,
                              (d(dcn["input"]), d(dcn["offset"]), d(dcn["mask"]), *DCN_OP_ARGS))
        torch.library.opcheck(torch.ops.detkit.dcnv4_core.default,
                              (d(dcn["input"]), d(dcn["offset_mask"]), *DCN_OP_ARGS))
        report["opcheck"] = True

        # ONNX: the TorchScript exporter (symbolics) and the current one (onnxscript).
        torch.manual_seed(0)
        layer = DeformConv2d(4, 6, 3, padding=1, offset_groups=2, modulated=True).eval()
        torch.nn.init.normal_(layer.offset_branch.weight, std=0.3)
        pooler = DeformRoIPool(4, 3, 0.5, sampling_ratio=2, modulated=True, hidden_dim=16).eval()
        for p in pooler.parameters():
            torch.nn.init.normal_(p, std=0.2)
        register_symbolics()
        nodes, errors = {{}}, {{}}
        for name, module, args, names in [("conv", layer, (x,), ["x"]), ("pool", pooler, (x, rois), ["x", "rois"])]:
            buffer = io.BytesIO()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = module(*args)
                torch.onnx.export(module, args, buffer, dynamo=False, opset_version=19, input_names=names)
            model = onnx.load_from_string(buffer.getvalue())
            nodes[name] = sorted(n.op_type for n in model.graph.node)
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            feeds = {{i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}}
            (got,) = session.run(None, feeds)
            errors[name] = float((torch.from_numpy(got) - expected).abs().max() / expected.abs().max())
        with torch.no_grad():
            program = torch.onnx.export(layer, (x,), dynamo=True, opset_version=19, verbose=False,
                                        custom_translation_table=custom_translation_table(19))
        nodes["conv_dynamo"] = sorted(n.op_type for n in program.model_proto.graph.node)

        # dcnv3_core / dcnv4_core: both exporters, run in onnxruntime against the op.
        class V3(torch.nn.Module):
            def forward(self, input, offset, mask):
                return ops.dcnv3_core(input, offset, mask, *DCN_ARGS)

        class V4(torch.nn.Module):
            def forward(self, input, offset_mask):
                return ops.dcnv4_core(input, offset_mask, *DCN_ARGS)

        for name, module, names in [("v3", V3(), ["input", "offset", "mask"]),
                                    ("v4", V4(), ["input", "offset_mask"])]:
            args = tuple(dcn[n] for n in names)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = module(*args)
                buffer = io.BytesIO()
                torch.onnx.export(module, args, buffer, dynamo=False, opset_version=19, input_names=names)
                program = torch.onnx.export(module, args, dynamo=True, opset_version=19, verbose=False,
                                            custom_translation_table=custom_translation_table(19))
            for kind, model in [("", onnx.load_from_string(buffer.getvalue())), ("_dynamo", program.model_proto)]:
                nodes[name + kind] = sorted(n.op_type for n in model.graph.node)
                session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                feeds = {{i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}}
                (got,) = session.run(None, feeds)
                errors[name + kind] = float((torch.from_numpy(got) - expected).abs().max() / expected.abs().max())
        report["nodes"], report["errors"] = nodes, errors
        print("REPORT" + json.dumps(report))
        """)
    result = _python(code)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    assert report["loaded"] is False and report["path"] == "pure"
    assert "could not be loaded" in report["require_ops"] and BUILD_COMMAND in report["require_ops"]
    assert report["schemas"] == {n: f"detkit::{op.schema}" for n, op in _dispatch.OPS.items()}
    assert len(report["warnings"]) == 1 and BUILD_COMMAND in report["warnings"][0]
    assert report["opcheck"]

    # The same values as the kernels in this process.
    outputs = torch.load(tmp_path / "outputs.pt")
    from tests.helpers import generator, normal, uniform
    gen = generator(5)
    x = normal((2, 4, 9, 8), gen, dtype=torch.float32)
    offset = normal((2, 2 * 2 * 9, 9, 8), gen, std=2.0, dtype=torch.float32)
    weight = normal((6, 2, 3, 3), gen, dtype=torch.float32)
    mask = uniform((2, 2 * 9, 9, 8), gen, 0, 1, dtype=torch.float32)
    rois = torch.tensor([[0, 1.0, 2.0, 12.0, 14.0], [1, -3.0, 0.5, 9.0, 7.0]])
    roi_offset = uniform((2, 2, 3, 3), gen, dtype=torch.float32)
    roi_mask = uniform((2, 1, 3, 3), gen, 0, 1, dtype=torch.float32)
    with _dispatch.set_mode("kernels"):
        conv = torch.ops.detkit.deform_conv2d(x, offset, weight, mask, None, [1, 1], [1, 1], [1, 1])
        pool = torch.ops.detkit.deform_roi_pool(x, rois, roi_offset, roi_mask, 3, 3, 0.5, 2, 0.1)
        dcn = _dcn_tensors()
        v3 = torch.ops.detkit.dcnv3_core(dcn["input"], dcn["offset"], dcn["mask"], *DCN_OP_ARGS)
        v4 = torch.ops.detkit.dcnv4_core(dcn["input"], dcn["offset_mask"], *DCN_OP_ARGS)
    for name, kernel in [("conv", conv), ("pool", pool), ("v3", v3), ("v4", v4)]:
        torch.testing.assert_close(outputs[name], kernel, rtol=2e-6, atol=2e-6 * float(kernel.abs().max()), msg=name)

    assert "DeformConv" in report["nodes"]["conv"] and "DeformConv" in report["nodes"]["conv_dynamo"]
    assert report["nodes"]["pool"].count("RoiAlign") == 2  # the plain pooling, then the shifted bins
    for name in ("v3", "v3_dynamo", "v4", "v4_dynamo"):
        assert report["nodes"][name].count("DeformConv") == 1, name
    assert max(report["errors"].values()) < 1e-5


# ---------------------------------------------------------------- training and export, fallback forced

@pytest.mark.slow
def test_smoke_training_and_onnx_export_on_the_pure_path(tmp_path):
    """`tools/train.py experiment=smoke` with DETKIT_OPS=pure, then tools/export_onnx.py of its
    checkpoint in a process without the extension: the same ONNX graph (node for node) as the
    export with the kernels, verified in onnxruntime by the tool."""
    run = tmp_path / "train"
    result = subprocess.run([sys.executable, "tools/train.py", "experiment=smoke", f"hydra.run.dir={run}"],
                            cwd=REPO, env=_env(DETKIT_OPS="pure", DETKIT_CACHE=str(tmp_path / "cache")),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "PureOpsWarning" not in result.stderr  # chosen, not a fallback: no warning
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics
    checkpoint = run / "checkpoints" / "last.pth"
    assert checkpoint.is_file()

    def export(name: str, prefix: str, **env: str) -> onnx.ModelProto:
        argv = ["tools/export_onnx.py", f"checkpoint={checkpoint}", f"output={tmp_path / name}",
                f"hydra.run.dir={tmp_path / (name + '_run')}"]
        code = prefix + f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path('tools/export_onnx.py', run_name='__main__')\n"
        done = _python(code, **env)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "DeformConv" in done.stdout
        return onnx.load(str(tmp_path / name))

    pure = export("pure.onnx", NO_EXTENSION, DETKIT_OPS="pure")
    kernels = export("kernels.onnx", "")
    assert [n.op_type for n in pure.graph.node] == [n.op_type for n in kernels.graph.node]


# ---------------------------------------------------------------- a wheel without the extension

@pytest.mark.slow
def test_wheel_without_extension_trains_smoke(tmp_path):
    """DETKIT_BUILD_EXT=0 `pip wheel --no-deps --no-build-isolation` of a clean copy of the
    sources (no build/ folder or compiled module to pick up), `pip install --no-deps --target
    DIR`, then experiment=smoke with PYTHONPATH=DIR, from outside the checkout."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "*.pyd", "__pycache__", "outputs", "runs",
        ".pytest_cache", "tests", "docs", "benchmarks"))
    (source / "README.md").write_text((REPO / "README.md").read_text())
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(wheels), str(source)],
                           env=_env(DETKIT_BUILD_EXT="0"), capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    assert "detkit: installing without the compiled ops (DETKIT_BUILD_EXT=0)" in built.stdout + built.stderr
    (wheel,) = wheels.glob("detkit-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")  # pure Python: no compiled module inside
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith((".so", ".pyd"))]
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-4000:]

    work = tmp_path / "work"
    work.mkdir()
    code = NO_EXTENSION.replace('sys.modules["detkit._C"] = None\n', "") + textwrap.dedent(f"""
        import runpy, detkit, detkit.ops
        from detkit.ops import _extension
        print("DETKIT", detkit.__file__, _extension.LOADED, detkit.ops.ops_path("cpu"), flush=True)
        sys.argv = ["detkit-train", "experiment=smoke", "hydra.run.dir={work / 'run'}"]
        runpy.run_module("detkit.cli.train", run_name="__main__")
        """)
    env = {k: v for k, v in _env(DETKIT_CACHE=str(tmp_path / "cache")).items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("DETKIT "))
    _, where, loaded, path = line.split()
    assert Path(where).is_relative_to(site) and loaded == "False" and path == "pure"
    assert result.stderr.count("PureOpsWarning") == 1  # the one fallback warning of the process
    assert (work / "run" / "metrics.json").is_file() and (work / "run" / "checkpoints" / "last.pth").is_file()
