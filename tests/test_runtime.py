import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from diffiml.runtime.errors import BundleError, ImageDecodeError
from diffiml.runtime.image_io import load_image, preprocess
from diffiml.runtime.localizer import Localizer


@pytest.fixture(scope="module")
def localizer(tiny_bundle):
    return Localizer.open(tiny_bundle, backend="ort-cpu", seed=0)


def _rgb(h=48, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_runtime_never_imports_torch(tiny_bundle, tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), _rgb())
    code = textwrap.dedent(f"""
        import sys
        from diffiml.runtime import Localizer
        loc = Localizer.open({str(tiny_bundle)!r}, backend="ort-cpu", uncertainty=True)
        r = loc.localize({str(tmp_path / 'a.png')!r})
        assert r.probability.shape == (48, 80)
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_command_line_loads_neither_ray_nor_pyarrow_nor_torch_until_a_command_needs_them():
    code = ("import sys; from diffiml.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('ray', 'pyarrow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_runtime_modules_import_nothing_of_train_export_or_torch():
    """The one-way import rule, read from the source: runtime -> nothing of ours that needs torch."""
    import ast
    from pathlib import Path

    forbidden = ("torch", "diffiml.train", "diffiml.export", "diffiml.benchmarks")
    runtime = Path(__file__).resolve().parents[1] / "runtime"
    for path in runtime.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"


def test_runtime_matches_the_reference_sampler(tiny_bundle, tiny_run):
    from diffiml.export.exporter import load_diffiml
    from diffiml.train.sampler import sample

    model, _ = load_diffiml(tiny_run)
    for tta in (False, True):
        loc = Localizer.open(tiny_bundle, backend="ort-cpu", steps=4, ensemble=3, seed=5, tta=tta)
        image = _rgb(64, 64)
        ours = loc.localize(image).model_probability
        x = torch.from_numpy(preprocess([image], 64, loc.bundle.mean, loc.bundle.std))
        ref = sample(model, x, steps=4, ensemble=3, seed=5, tta=tta).probability[0, 0].numpy()
        assert np.abs(ours - ref).max() <= 1e-3


def test_same_seed_gives_bit_identical_masks(tiny_bundle):
    a = Localizer.open(tiny_bundle, backend="ort-cpu", seed=3).localize(_rgb())
    b = Localizer.open(tiny_bundle, backend="ort-cpu", seed=3).localize(_rgb())
    assert np.array_equal(a.probability, b.probability) and np.array_equal(a.mask, b.mask)


def test_batch_and_single_calls_agree(localizer):
    images = [_rgb(seed=i) for i in range(3)]
    batch = localizer.localize_batch(images)
    for image, result in zip(images, batch, strict=True):
        np.testing.assert_allclose(localizer.localize(image).probability, result.probability, atol=1e-5)


def test_eight_threads_share_one_localizer(localizer):
    images = [_rgb(seed=i) for i in range(8)]
    expected = [localizer.localize(im).probability for im in images]
    got: dict[int, np.ndarray] = {}

    def work(i):
        got[i] = localizer.localize(images[i]).probability

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_array_equal(got[i], expected[i])


def test_result_has_maps_at_original_size_score_and_timings(tiny_bundle):
    loc = Localizer.open(tiny_bundle, backend="ort-cpu", uncertainty=True)
    r = loc.localize(_rgb(37, 91))
    assert r.probability.shape == r.mask.shape == r.uncertainty.shape == (37, 91)
    assert r.probability.dtype == np.float32 and r.mask.dtype == bool
    assert 0.0 <= r.score <= 1.0 and (r.uncertainty >= 0).all()
    assert {"encoder", "unet_steps", "decoder", "preprocess", "postprocess"} <= set(r.timings_ms)


@pytest.mark.parametrize("image", [
    np.zeros((1, 1, 3), np.uint8),
    np.full((20, 30), 128, np.uint8),
    np.full((20, 30, 4), 200, np.uint8),
    np.full((20, 30, 3), 40000, np.uint16),
])
def test_odd_arrays_are_handled(localizer, image):
    assert localizer.localize(image).probability.shape == image.shape[:2]


@pytest.mark.parametrize("image", [
    np.zeros((1, 1, 3), np.uint8),
    np.full((20, 30), 128, np.uint8),
    np.full((20, 30, 4), 200, np.uint8),
    np.full((20, 30, 3), 40000, np.uint16),
])
def test_odd_png_files_are_handled(localizer, image, tmp_path):
    path = tmp_path / "odd.png"
    cv2.imwrite(str(path), image)
    assert localizer.localize(path).probability.shape == image.shape[:2]


def test_exif_orientation_is_honoured(tmp_path):
    """A JPEG stored landscape with EXIF orientation 6 (rotate 90) is a portrait image."""
    ok, jpg = cv2.imencode(".jpg", np.zeros((20, 40, 3), np.uint8))
    exif = (b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
            b"\x00\x00\x00\x00")
    app1 = b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif
    data = jpg.tobytes()
    decoded = load_image(data[:2] + app1 + data[2:])
    assert (decoded.height, decoded.width) == (40, 20)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"GIF89a garbage", "not a decodable image"),
    (None, "not a decodable image"),  # truncated PNG
])
def test_bad_files_raise_a_typed_error_naming_them(tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content is None:
        ok, png = cv2.imencode(".png", _rgb())
        content = png.tobytes()[:60]
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=f"bad\\.png.*{message}"):
        load_image(path)


def test_absurd_sizes_are_refused_before_decoding(tmp_path):
    ok, png = cv2.imencode(".png", _rgb(2, 2))
    data = bytearray(png.tobytes())
    data[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        load_image(bytes(data))


def test_auto_moves_past_tensorrt_when_the_bundle_has_no_engines_for_it(tiny_bundle, monkeypatch):
    """As on a GPU machine with TensorRT: the bundle (fused attention) has no engines, so auto takes ort-cpu here."""
    from diffiml.runtime.backends import open_backend, tensorrt_backend
    from diffiml.runtime.bundle import load_bundle

    monkeypatch.setattr(tensorrt_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(tensorrt_backend, "device_identity", lambda device_id=0: {
        "compute_capability": "9.0", "device_name": "H100", "tensorrt_version": "10.13", "platform": "x86_64"})
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(BundleError, match="no TensorRT engines"):
        open_backend(bundle, "tensorrt")
    backend = open_backend(bundle, "auto")
    assert backend.name == "ort-cpu"
    assert "no TensorRT engines" in backend.skipped["tensorrt"] and "ort-cuda" in backend.skipped


def test_an_unknown_backend_is_refused(tiny_bundle):
    from diffiml.runtime.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        Localizer.open(tiny_bundle, backend="ort-gpu")


@pytest.mark.gpu
def test_ort_cuda_matches_ort_cpu(tiny_bundle):
    image = _rgb(64, 64)
    cpu = Localizer.open(tiny_bundle, backend="ort-cpu").localize(image).probability
    cuda = Localizer.open(tiny_bundle, backend="ort-cuda").localize(image).probability
    assert np.abs(cpu - cuda).max() < 1e-3


def test_missing_bundle_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Localizer.open(tmp_path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "diffiml.cli", *args], capture_output=True, text=True)


def test_inputs_sharing_a_stem_get_outputs_of_their_own(tiny_bundle, tmp_path):
    """a/x.png and b/x.png in one run: each keeps its own maps (they used to overwrite each other)."""
    for i, folder in enumerate(("a", "b")):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "x.png"), _rgb(seed=i))
    cv2.imwrite(str(tmp_path / "a" / "y.png"), _rgb(seed=3))
    out = tmp_path / "out"
    done = _cli("localize", str(tmp_path / "a"), str(tmp_path / "b"), "--bundle", str(tiny_bundle), "--out", str(out),
                "--backend", "ort-cpu")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    masks = [line["outputs"]["mask"] for line in lines]
    assert len(set(masks)) == 3 and all(Path(m).is_file() for m in masks)
    assert (out / "y_mask.png").is_file()  # a stem used once keeps its plain name
    probs = {line["path"]: cv2.imread(line["outputs"]["prob"], cv2.IMREAD_UNCHANGED) for line in lines}
    assert not np.array_equal(probs[str(tmp_path / "a" / "x.png")], probs[str(tmp_path / "b" / "x.png")])


def test_cli_writes_outputs_and_json_lines(tiny_bundle, tmp_path):
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), _rgb(seed=i))
    out = tmp_path / "out"
    done = _cli("localize", str(tmp_path / "*.png"), "--bundle", str(tiny_bundle), "--out", str(out),
                "--uncertainty", "--backend", "ort-cpu")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["path"].endswith(f"img{i}.png") for i, line in enumerate(lines)] == [True, True]
    assert {"score", "manipulated_fraction", "timings_ms"} <= set(lines[0])
    prob = cv2.imread(str(out / "img0_prob.png"), cv2.IMREAD_UNCHANGED)
    assert prob.dtype == np.uint16 and prob.shape == (48, 80)
    for kind in ("mask", "overlay", "uncertainty"):
        assert (out / f"img0_{kind}.png").is_file()
    assert not list(out.glob(".*tmp*"))


def test_cli_reports_bad_inputs_in_one_line_and_finishes_the_rest(tiny_bundle, tmp_path):
    cv2.imwrite(str(tmp_path / "good.png"), _rgb())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    done = _cli("localize", str(tmp_path / "broken.png"), str(tmp_path / "good.png"), str(tmp_path / "empty.jpg"),
                str(tmp_path / "notes.txt"), str(tmp_path / "missing.png"), "--bundle", str(tiny_bundle),
                "--out", str(out))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("diffiml localize: /")]
    assert len(errors) == 4 and all(any(n in e for n in ("broken", "empty", "notes", "missing")) for e in errors)
    assert (out / "good_mask.png").is_file() and not list(out.glob("broken*"))


def test_cli_refuses_a_tampered_bundle_in_one_line(tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    (bad / "mask_decoder.onnx").write_bytes(b"tampered")
    cv2.imwrite(str(tmp_path / "a.png"), _rgb())
    done = _cli("localize", str(tmp_path / "a.png"), "--bundle", str(bad), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "mask_decoder.onnx" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_reference_path_runs_the_torch_sampler(tiny_bundle, tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), _rgb(64, 64))
    ours = _cli("localize", str(tmp_path / "a.png"), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o1"))
    ref = _cli("localize", str(tmp_path / "a.png"), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "o2"),
               "--reference")
    assert ours.returncode == ref.returncode == 0, ref.stderr
    assert json.loads(ref.stdout)["backend"] == "torch-reference"
    a = cv2.imread(str(tmp_path / "o1/a_prob.png"), cv2.IMREAD_UNCHANGED).astype(int)
    b = cv2.imread(str(tmp_path / "o2/a_prob.png"), cv2.IMREAD_UNCHANGED).astype(int)
    assert np.abs(a - b).max() <= 0.001 * 65535


def test_adaptive_ensemble_is_the_fixed_one_when_it_runs_every_member(tiny_bundle):
    """All N members (a tolerance nothing meets): bit for bit the fixed N. Stopped at once (a tolerance everything
    meets): bit for bit the fixed ensemble of that many members, since members are the same draws in order."""
    from diffiml.runtime.localizer import AdaptiveEnsemble

    image = _rgb(64, 64, seed=3)
    fixed = {n: Localizer.open(tiny_bundle, backend="ort-cpu", steps=4, ensemble=n, seed=2).localize(image)
             for n in (2, 5)}
    every = Localizer.open(tiny_bundle, backend="ort-cpu", steps=4, ensemble="auto:5", seed=2,
                           adaptive=AdaptiveEnsemble(tolerance=-1.0)).localize(image)
    assert every.members == 5 and np.array_equal(every.model_probability, fixed[5].model_probability)
    early = Localizer.open(tiny_bundle, backend="ort-cpu", steps=4, ensemble="auto:5", seed=2,
                           adaptive=AdaptiveEnsemble(first=1, step=1, tolerance=1.0)).localize(image)
    assert early.members == 2 and np.array_equal(early.model_probability, fixed[2].model_probability)
    assert not np.array_equal(fixed[2].model_probability, fixed[5].model_probability)


def test_adaptive_ensemble_chunks_and_parsing():
    from diffiml.runtime.localizer import AdaptiveEnsemble, parse_ensemble

    assert AdaptiveEnsemble(first=2, step=2).chunks(7) == [2, 2, 2, 1]
    assert AdaptiveEnsemble(first=8).chunks(5) == [5]
    assert parse_ensemble("auto:8", 5)[0] == 8 and parse_ensemble("auto", 5)[1] is not None
    assert parse_ensemble("3", 5) == (3, None)
    with pytest.raises(ValueError, match="auto:N"):
        parse_ensemble("many", 5)


def test_cli_reports_members_of_an_adaptive_ensemble(tiny_bundle, tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), _rgb(64, 64))
    run = subprocess.run([sys.executable, "-m", "diffiml.cli", "localize", str(tmp_path / "a.png"), "--bundle",
                          str(tiny_bundle), "--out", str(tmp_path / "out"), "--ensemble", "auto:4",
                          "--ensemble-tolerance", "1.0", "--steps", "4"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["members"] == 2


@pytest.mark.parametrize("session, expected", [
    ("falls back to the CPU", False), ("fails to compute", False), ("raises", False), ("computes on CUDA", True)])
def test_cuda_available_needs_a_working_cuda_session(monkeypatch, session, expected):
    """A wheel that lists the CUDA provider is not proof of a GPU: the probe session must keep CUDA and compute.
    The sessions are stand-ins, so every case runs whichever onnxruntime wheel is installed."""
    import onnxruntime as ort

    from diffiml.runtime.backends import ort_backend

    probe = ort.InferenceSession(ort_backend._RELU_PROBE, providers=["CPUExecutionProvider"])
    assert probe.run(None, {"x": np.array([-1, 0, 1, 2], np.float32)})[0].tolist() == [0, 0, 1, 2]

    class Session:
        def __init__(self, *args, **kwargs):
            if session == "raises":
                raise RuntimeError("CUDA driver version is insufficient")

        def get_providers(self):
            return ["CPUExecutionProvider"] if session == "falls back to the CPU" else ["CUDAExecutionProvider"]

        def run(self, _names, feeds):
            return [np.maximum(feeds["x"], 0) if session == "computes on CUDA" else np.zeros(4, np.float32)]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    if hasattr(ort, "preload_dlls"):
        monkeypatch.setattr(ort, "preload_dlls", lambda: None)
    ort_backend.cuda_available.cache_clear()
    try:
        assert ort_backend.cuda_available() is expected
    finally:
        ort_backend.cuda_available.cache_clear()


def test_the_image_score_is_the_mean_of_the_top_half_percent_not_of_all_pixels():
    from diffiml.runtime.localizer import image_score

    prob = np.zeros((100, 100), np.float32)
    prob.flat[:50] = 1.0  # exactly the top 0.5 %
    prob.flat[50:100] = 0.5
    assert image_score(prob) == pytest.approx(1.0)
    prob.flat[:50] = 0.8
    assert image_score(prob) == pytest.approx(0.8)  # neither the max nor the mean (0.0065)


def test_uncertainty_is_the_standard_deviation_of_the_members_probabilities(tiny_bundle):
    loc = Localizer.open(tiny_bundle, backend="ort-cpu", ensemble=4, uncertainty=True, seed=3)
    decoder = loc.engines["mask_decoder"]
    seen = []
    original = decoder.run

    def recording(feeds):
        out = original(feeds)
        seen.append(out["probability"].copy())
        return out

    decoder.run = recording
    try:
        r = loc.localize(_rgb(64, 64, seed=5))
    finally:
        decoder.run = original
    members = seen[-1][:, 0]  # the decoder's last call: every member on its own
    assert members.shape[0] == 4 and members.std(axis=0).max() > 1e-3  # the members do differ
    np.testing.assert_allclose(r.model_uncertainty, members.std(axis=0), atol=1e-6)


def test_16_bit_input_keeps_its_high_byte():
    from diffiml.runtime.image_io import to_rgb8

    sixteen = np.array([[0, 0x00FF, 0x8000, 0xFFFF]], np.uint16)
    assert to_rgb8(sixteen)[0, :, 0].tolist() == [0, 0, 128, 255]  # shifted, not wrapped (255, 0, 255)


def test_exif_orientation_is_honoured_in_reduced_decoding_too():
    """A large landscape JPEG with EXIF orientation 6, decoded at 1/8 for a small model, is a portrait image."""
    from PIL import Image

    buf = __import__("io").BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_rgb(512, 1024)).save(buf, "JPEG", exif=exif.tobytes())
    decoded = load_image(buf.getvalue(), model_size=32)
    assert decoded.rgb.shape[:2] == (128, 64)  # reduced, and rotated: taller than wide
    assert (decoded.height, decoded.width) == (1024, 512)


def test_localizer_closes_its_own_backend_and_leaves_a_shared_one(tiny_bundle):
    from diffiml.runtime.backends import open_backend
    from diffiml.runtime.bundle import load_bundle
    from diffiml.runtime.errors import BackendUnavailableError

    closed = []
    with Localizer.open(tiny_bundle, backend="ort-cpu") as loc:
        loc.step_loop.close = lambda: closed.append("step loop")  # what a device backend frees
        loc.localize(_rgb())
    assert closed == ["step loop"] and loc._backend.closed
    loc.close()  # idempotent
    assert closed == ["step loop"]
    with pytest.raises(BackendUnavailableError, match="closed"):
        loc.localize(_rgb())

    bundle = load_bundle(tiny_bundle)
    shared = open_backend(bundle, "ort-cpu")
    first, second = (Localizer(bundle, shared, 4, n, False, 0, False) for n in (1, 2))
    assert first._backend.lock is second._backend.lock  # one lock guards the shared buffers
    first.close()
    assert not shared.closed and second.localize(_rgb()).mask.shape == (48, 80)


def test_images_of_different_seeds_in_one_batch_get_their_own_seeds_results(tiny_bundle):
    images = [_rgb(seed=i) for i in range(3)]
    seeds = [0, 7, 7]
    together = Localizer.open(tiny_bundle, backend="ort-cpu", tta=True).localize_batch(images, seeds=seeds)
    for image, seed, got in zip(images, seeds, together, strict=True):
        alone = Localizer.open(tiny_bundle, backend="ort-cpu", tta=True, seed=seed).localize(image)
        np.testing.assert_allclose(got.model_probability, alone.model_probability, atol=1e-5)
    seed0 = Localizer.open(tiny_bundle, backend="ort-cpu", tta=True).localize(images[1])
    assert not np.allclose(together[1].model_probability, seed0.model_probability)
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        Localizer.open(tiny_bundle, backend="ort-cpu").localize_batch(images, seeds=[1, 2])
