import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from diffiml.export.exporter import ExportError, check_against_torch, export_bundle, load_diffiml
from diffiml.export.graphs import graph_specs
from diffiml.runtime.bundle import FORMAT_VERSION, load_bundle
from diffiml.runtime.errors import BundleError
from diffiml.train.checkpoint import save_checkpoint
from diffiml.train.config import get_config
from diffiml.train.model import DiffIML
from diffiml.train.sampler import sample


def test_manifest_describes_every_graph(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["opset"] >= 17
    assert manifest["sampling"]["schedules"]["8"]["timesteps"] == [875, 750, 625, 500, 375, 250, 125, 0]
    unet = manifest["graphs"]["unet"]
    names = [t["name"] for t in unet["inputs"]]
    assert names == ["latents", "cond_features", "timestep", "coef_x0", "coef_xt", "sqrt_alpha"]
    assert unet["inputs"][0]["shape"][0] == "members" and unet["inputs"][1]["shape"][0] == "images"
    assert set(manifest["checks"]["fp32_max_abs_error_vs_torch"]) == set(manifest["graphs"])  # what export checked
    assert len(manifest["checkpoint"]["sha256"]) == 64 and not manifest["checkpoint"]["path"].startswith("/")


@pytest.mark.parametrize("attention", ["fused", "standard"])
def test_graphs_match_torch_at_two_batch_sizes_random_weights(attention):
    torch.manual_seed(0)
    model = DiffIML(get_config("tiny")).eval()
    torch.nn.init.normal_(model.encoder.correlation_proj.weight, std=0.2)  # the self-correlation stage counts
    for spec, module in graph_specs(model).values():
        from diffiml.export.exporter import export_graph

        data = export_graph(spec, module, {"images": 2, "members": 4, "latents": 2}, attention)
        # Raises ExportError above 1e-4 (the test below shows it does).
        check_against_torch(spec, module, data, [{"images": 1, "members": 1, "latents": 1},
                                                 {"images": 3, "members": 6, "latents": 3}])


def test_a_graph_that_drifts_from_torch_fails_the_export():
    torch.manual_seed(0)
    model = DiffIML(get_config("tiny")).eval()
    spec, module = graph_specs(model)["mask_decoder"]
    from diffiml.export.exporter import export_graph

    data = export_graph(spec, module, {"latents": 2})
    with torch.no_grad():
        model.vae.decoder[-1].bias += 1.0  # torch changes after export: the check must catch it
    with pytest.raises(ExportError, match="max \\|diff\\|"):
        check_against_torch(spec, module, data, [{"latents": 1}])


def test_bundle_matches_reference_sampler_end_to_end(tiny_bundle, tiny_run):
    """Plain onnxruntime over the three graphs, same noise, against the PyTorch reference."""
    bundle = load_bundle(tiny_bundle)
    model, _ = load_diffiml(tiny_run)
    sessions = {n: ort.InferenceSession(str(bundle.graph(n).path)) for n in ("condition_encoder", "unet",
                                                                              "mask_decoder")}
    image = torch.randn(2, 3, 64, 64)
    steps, n = 4, 3
    ref = sample(model, image, steps=steps, ensemble=n, seed=11).probability.numpy()
    from diffiml.schedule import ensemble_noise

    noise = ensemble_noise(11, n, bundle.latent_shape)
    cond = sessions["condition_encoder"].run(None, {"image": image.numpy()})[0]
    z = np.concatenate([noise, noise])
    plan = bundle.plan(steps)
    for t, c0, ct, sa in plan.steps():
        z = sessions["unet"].run(None, {"latents": z, "cond_features": cond, "timestep": np.array([t], np.float32),
                                        **{k: np.array([v], np.float32) for k, v in
                                           (("coef_x0", c0), ("coef_xt", ct), ("sqrt_alpha", sa))}})[0]
    prob = sessions["mask_decoder"].run(None, {"latents": z.reshape(2, n, *z.shape[1:]).mean(1)})[0]
    assert np.abs(prob - ref).max() <= 1e-3


def test_export_is_deterministic(tiny_run, tiny_bundle, tmp_path):
    again = export_bundle(tiny_run, tmp_path / "again")
    first = json.loads((tiny_bundle / "manifest.json").read_text())
    assert {k: v["sha256"] for k, v in again["graphs"].items()} == {k: v["sha256"] for k, v in first["graphs"].items()}


def test_corrupted_graph_is_refused(tiny_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    with open(bad / "unet.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="unet.onnx: sha256"):
        load_bundle(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=99), "unknown bundle format_version 99"),
    (lambda m: m["graphs"]["unet"].update(sha256="0" * 64), "does not match the manifest"),
    (lambda m: m.pop("graphs"), "lacks graphs"),
    # what the runtime does not implement: other preprocessing, other tensor names
    (lambda m: m["input"].update(color="BGR"), "input preprocessing"),
    (lambda m: m["input"].update(resize="bilinear"), "input preprocessing"),
    (lambda m: m["graphs"]["unet"]["outputs"][0].update(name="z_next"), "this runtime feeds and reads"),
    (lambda m: m["sampling"].update(eta=1.0), "sampling .* is not what the UNet-step graphs"),
    (lambda m: m["sampling"].update(prediction_type="epsilon"), "sampling .* is not what the UNet-step graphs"),
])
def test_bad_manifest_is_refused_with_a_clear_error(tiny_bundle, tmp_path, edit, message):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bad)


def test_informational_keys_are_not_needed_to_run(tiny_bundle, tmp_path):
    """The exporter's record (model, opset, producer, attention, checks, checkpoint) is never read by the runtime:
    a bundle without it loads and localizes; only --reference, which needs the checkpoint, says it is absent."""
    from diffiml.runtime.localizer import Localizer

    lean = tmp_path / "lean"
    shutil.copytree(tiny_bundle, lean)
    manifest = json.loads((lean / "manifest.json").read_text())
    for key in ("model", "opset", "producer", "attention", "checks", "checkpoint"):
        manifest.pop(key)
    (lean / "manifest.json").write_text(json.dumps(manifest))
    assert Localizer.open(lean, backend="ort-cpu").localize(np.zeros((20, 20, 3), np.uint8)).mask.shape == (20, 20)
    with pytest.raises(BundleError, match="names no checkpoint"):
        load_bundle(lean).checkpoint_path()


def test_fused_attention_for_onnxruntime_standard_ops_for_tensorrt(tiny_run, tiny_bundle, tmp_path):
    """The default bundle's UNet uses onnxruntime's fused attention; --attention standard writes plain ONNX ops
    that compute the same; build-engines refuses the fused one, before it needs TensorRT."""
    from diffiml.export.tensorrt_build import build_bundle_engines

    fused = load_bundle(tiny_bundle)
    assert fused.graph("unet").nonstandard_domains == ["com.microsoft"]
    assert fused.manifest["attention"] == "fused"
    export_bundle(tiny_run, tmp_path / "standard", attention="standard")
    standard = load_bundle(tmp_path / "standard")
    assert all(not standard.graph(g).nonstandard_domains for g in ("condition_encoder", "unet", "mask_decoder"))
    spec, _ = graph_specs(load_diffiml(tiny_run)[0])["unet"]
    feeds = {k: v.numpy() for k, v in spec.sample_inputs({"images": 2, "members": 6}).items()}
    out = [ort.InferenceSession(str(b.graph("unet").path)).run(None, feeds)[0] for b in (fused, standard)]
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    with pytest.raises(ValueError, match="onnxruntime-only operators"):
        build_bundle_engines(tiny_bundle, "fp32", 1)
    with pytest.raises(ValueError, match="no fp16 graphs to build from"):  # strongly typed: from the fp16 graphs
        build_bundle_engines(tmp_path / "standard", "fp16", 1)
    with pytest.raises(ValueError, match="bf16"):
        build_bundle_engines(tmp_path / "standard", "bf16", 1)


def test_baseline_checkpoints_do_not_export(tmp_path):
    from diffiml.train.model import DiscriminativeBaseline

    save_checkpoint(tmp_path, DiscriminativeBaseline(get_config("tiny")), {"kind": "baseline",
                                                                          "model": get_config("tiny").to_json()})
    with pytest.raises(ExportError, match="baseline"):
        export_bundle(tmp_path, tmp_path / "out")


def test_the_tensorrt_backend_says_why_it_cannot_run(monkeypatch):
    """Each reason, from stand-ins for the tensorrt module and the CUDA runtime (none of them is here)."""
    import sys
    import types

    from diffiml.runtime.backends import tensorrt_backend

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs alone leaves
    assert "TensorRT is not installed" in tensorrt_backend.unavailable_reason()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(Builder=object))
    devices = {"count": 0}
    monkeypatch.setattr(tensorrt_backend, "cudart", lambda: types.SimpleNamespace(
        cudaGetDeviceCount=lambda: devices["count"]))
    monkeypatch.setattr(tensorrt_backend, "check", lambda result: result)
    assert tensorrt_backend.unavailable_reason() == "no CUDA device" and not tensorrt_backend.available()
    devices["count"] = 1
    assert tensorrt_backend.unavailable_reason() is None and tensorrt_backend.available()


def test_engines_built_for_another_gpu_or_tensorrt_are_refused_naming_both(tiny_bundle):
    from diffiml.runtime.backends.tensorrt_backend import select_engines

    bundle = load_bundle(tiny_bundle)
    entry = {"file": "x.engine", "sha256": "0" * 64, "compute_capability": "8.6", "device_name": "RTX 3090",
             "tensorrt_version": "10.3.0"}
    manifest = {**bundle.manifest, "engines": [{**entry, "graph": g} for g in ("condition_encoder", "unet",
                                                                               "mask_decoder")]}
    here = {"compute_capability": "9.0", "device_name": "H100", "tensorrt_version": "10.13.0"}
    with pytest.raises(BundleError, match=r"RTX 3090.*8\.6.*10\.3\.0.*H100.*9\.0.*10\.13\.0"):
        select_engines(type(bundle)(bundle.root, manifest), here)
    assert set(select_engines(type(bundle)(bundle.root, manifest), {**here, "compute_capability": "8.6",
                                                                    "tensorrt_version": "10.3.0"})) == {
        "condition_encoder", "unet", "mask_decoder"}


def test_reduced_precisions_are_checked_verified_and_used(tiny_run, synthetic_set, tmp_path, tiny_bundle):
    """int8: QDQ graphs for the encoder and UNet (the decoder stays fp32); fp16: every graph in fp16 but the DDIM
    update, normalizations and sigmoid. Both compared with fp32 and recorded, verified by sha256 like every graph,
    run by the runtime when asked for, refused where absent."""
    import onnx

    from diffiml.runtime.localizer import Localizer
    from diffiml.train.data.readers import read_dataset

    images = [s.image for s in read_dataset(synthetic_set / "train.json")]
    out = tmp_path / "reduced"
    manifest = export_bundle(tiny_run, out, int8_calibration=images[:8], check_images=images[8:11],
                             int8_min_agreement=0.0, fp16=True)
    int8, fp16 = manifest["precisions"]["int8"], manifest["precisions"]["fp16"]
    assert set(int8["graphs"]) == {"condition_encoder", "unet"}
    assert set(fp16["graphs"]) == {"condition_encoder", "unet", "mask_decoder"}
    from diffiml.runtime.metrics import map_agreement

    reference = [Localizer.open(out, backend="ort-cpu").localize(im).model_probability for im in images[8:11]]
    for name, entry in (("int8", int8), ("fp16", fp16)):  # the recorded check is what the runtime really gives
        got = [Localizer.open(out, backend="ort-cpu", precision=name).localize(im).model_probability
               for im in images[8:11]]
        agreement, max_dp = map_agreement(reference, got)
        assert entry["checks"]["images"] == 3 and max_dp > 0
        assert entry["checks"]["mask_agreement_vs_fp32"] == pytest.approx(agreement)
        assert entry["checks"]["max_abs_probability_diff_vs_fp32"] == pytest.approx(max_dp)
    for g in int8["graphs"].values():
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(out / g["file"])).graph.node}
    unet16 = onnx.load(str(out / fp16["graphs"]["unet"]["file"]))
    assert {i.data_type for i in unet16.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert {i.type.tensor_type.elem_type for i in unet16.graph.input} == {onnx.TensorProto.FLOAT}
    # the DDIM update (outside the /unet/ module) reads fp32: a Cast to fp32 feeds it
    update_inputs = {i for n in unet16.graph.node if n.name in ("/Clip", "/Sub") for i in n.input}
    casts = {n.output[0]: n for n in unet16.graph.node if n.op_type == "Cast"}
    assert any(casts[i].attribute[0].i == onnx.TensorProto.FLOAT for i in update_inputs if i in casts)

    bundle = load_bundle(out)
    assert bundle.precisions == ["fp32", "fp16", "int8"]
    assert bundle.graph("mask_decoder", "int8").path.name == "mask_decoder.onnx"
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    fp32 = Localizer.open(out, backend="ort-cpu", steps=4, ensemble=2).localize(image).model_probability
    for precision, bound in (("int8", 0.25), ("fp16", 0.02)):
        got = Localizer.open(out, backend="ort-cpu", steps=4, ensemble=2, precision=precision).localize(image)
        assert not np.array_equal(got.model_probability, fp32), precision  # that precision's graphs really ran
        assert np.abs(got.model_probability - fp32).max() < bound, precision

    with pytest.raises(BundleError, match="no int8 graphs"):
        Localizer.open(tiny_bundle, backend="ort-cpu", precision="int8")
    from diffiml.export.quantize import add_int8

    gated = tmp_path / "gated"
    shutil.copytree(tiny_bundle, gated)
    with pytest.raises(ValueError, match="agree with fp32"):  # the gate refuses int8 below its agreement
        add_int8(gated, images[:4], images[8:9], min_agreement=1.01)
    with open(out / int8["graphs"]["unet"]["file"], "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(out)
