"""Progressive distillation (train/distill.py) and the bundle that carries its student (format 6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffiml.cli import main
from diffiml.export.exporter import ExportError, export_bundle, load_diffiml
from diffiml.runtime.bundle import load_bundle
from diffiml.runtime.errors import BundleError
from diffiml.runtime.image_io import preprocess
from diffiml.runtime.localizer import Localizer
from diffiml.schedule import DdimPlan, ddim_plan, plan_through
from diffiml.train.config import get_config
from diffiml.train.distill import ProgressiveDistillation, distill_rounds, student_plan
from diffiml.train.model import DiffIML
from diffiml.train.sampler import denoise_from_condition, sample
from diffiml.train.trainer import TrainOptions


def test_a_student_plan_takes_every_other_teacher_timestep():
    full = ddim_plan(8)
    same = plan_through(full.timesteps)
    for key in ("timesteps", "coef_x0", "coef_xt", "sqrt_alpha"):
        assert np.array_equal(getattr(full, key), getattr(same, key))
    assert student_plan(full).timesteps.tolist() == [875, 625, 375, 125]
    assert student_plan(student_plan(full)).timesteps.tolist() == [875, 375]
    assert student_plan(full).coef_x0[-1] == 1.0  # the last step lands on the clean latent
    with pytest.raises(ValueError, match="cannot be halved"):
        student_plan(ddim_plan(5))
    with pytest.raises(ValueError, match="descend"):
        plan_through([100, 300])


def _first(plan: DdimPlan, n: int) -> DdimPlan:
    """The first n steps of a plan (their coefficients do not depend on what follows)."""
    return DdimPlan(*(getattr(plan, k)[:n] for k in ("timesteps", "coef_x0", "coef_xt", "sqrt_alpha")))


def test_one_student_step_with_its_target_lands_where_two_teacher_steps_do():
    """Checked against the reference sampler, not the distiller's own trajectory: a target built from the teacher's
    single step (or any other state) lands elsewhere."""
    torch.manual_seed(0)
    model = DiffIML(get_config("tiny")).eval()
    teacher = ddim_plan(4)
    distill = ProgressiveDistillation(model, teacher)
    image = torch.randn(1, 3, 64, 64)
    noise = torch.randn(1, 8, 8, 8)
    cond, z, target = distill.targets(image, noise)
    encoded = model.encoder(image)
    expected = [denoise_from_condition(model, encoded, noise, 2, plan=_first(teacher, 2))[:, 0],
                denoise_from_condition(model, encoded, noise, 4)[:, 0]]
    starts = [noise, expected[0]]
    plan = distill.plan
    for i in range(2):
        assert torch.allclose(z[:, i], starts[i], atol=1e-5)
        x = target[:, i]  # the update without the runtime's clip: the target is what makes it exact
        landed = plan.coef_x0[i] * x + plan.coef_xt[i] * (z[:, i] - plan.sqrt_alpha[i] * x)
        assert torch.allclose(landed, expected[i], atol=1e-4), i
    assert float(distill.loss(image, generator=torch.Generator().manual_seed(0)).detach()) > 0


def test_only_the_unet_learns_and_the_shared_parts_stay_the_teachers():
    model = DiffIML(get_config("tiny"))
    distill = ProgressiveDistillation(model, ddim_plan(4))
    learning = {n for n, p in distill.named_parameters() if p.requires_grad}
    assert learning and all(n.startswith("student.unet.") for n in learning)
    assert not any("condition_entry" in n for n in learning)  # folded into the encoder graph the bundle shares
    distill.train()
    assert not distill.student.encoder.training  # its BatchNorm statistics stay the teacher's


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_run, synthetic_set) -> Path:
    out = tmp_path_factory.mktemp("distill") / "run"
    assert main(["distill", str(tiny_run), "--data", str(synthetic_set / "train.json"), "--out", str(out),
                 "--to", "1", "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2"]) == 0
    return out


def test_distill_runs_rounds_and_records_each_students_plan(distilled):
    for k, timesteps in ((2, [750, 250]), (1, [750])):
        config = json.loads((distilled / f"steps-{k}" / "checkpoint" / "config.json").read_text())
        assert config["distilled"]["timesteps"] == timesteps


def test_a_killed_distillation_resumes_to_the_same_weights(distilled, tiny_run, synthetic_set, tmp_path):
    from diffiml.train.data.dataset import ForgeryDataset
    from diffiml.train.data.readers import read_dataset

    data = ForgeryDataset(read_dataset(synthetic_set / "train.json"), 64, train=False)
    cut = TrainOptions(steps=4, batch_size=2, lr=5e-5, checkpoint_every=2, stop_after=3)  # the CLI defaults
    distill_rounds(tiny_run, data, tmp_path, 1, cut)  # "killed" after step 3 of the first round
    assert not (tmp_path / "steps-1").exists()
    assert main(["distill", str(tiny_run), "--data", str(synthetic_set / "train.json"), "--out", str(tmp_path),
                 "--to", "1", "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2"]) != 0  # needs --resume
    assert main(["distill", str(tiny_run), "--data", str(synthetic_set / "train.json"), "--out", str(tmp_path),
                 "--to", "1", "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2", "--resume"]) == 0
    for k in (2, 1):
        ours = load_file(str(tmp_path / f"steps-{k}" / "checkpoint" / "model.safetensors"))
        uncut = load_file(str(distilled / f"steps-{k}" / "checkpoint" / "model.safetensors"))
        assert all(torch.equal(ours[n], uncut[n]) for n in uncut)


@pytest.fixture(scope="module")
def student_bundle(tmp_path_factory, tiny_run, distilled) -> Path:
    out = tmp_path_factory.mktemp("engines") / "with-student"
    export_bundle(tiny_run, out, students=[distilled / "steps-2"])
    return out


def test_the_bundle_runs_the_student_for_its_step_count_and_the_teacher_otherwise(student_bundle, tiny_run,
                                                                                   distilled):
    bundle = load_bundle(student_bundle)
    assert bundle.manifest["format_version"] == 6
    assert bundle.unet_graph(2) == "unet_k2" and bundle.unet_graph(4) == "unet" and bundle.distilled_steps == [2]
    assert bundle.plan(2).timesteps.tolist() == [750, 250]
    assert "unet_k2" in bundle.sha256s
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    teacher, _ = load_diffiml(tiny_run)
    student, _ = load_diffiml(distilled / "steps-2")
    for steps, model, plan in ((2, student, bundle.plan(2)), (4, teacher, None)):
        with Localizer.open(student_bundle, backend="ort-cpu", steps=steps, ensemble=2, seed=5,
                            copy_move=False) as localizer:
            got = localizer.localize(image).model_probability
            x = torch.from_numpy(preprocess([image], 64, localizer.bundle.mean, localizer.bundle.std))
        ref = sample(model, x, steps=steps, ensemble=2, seed=5, plan=plan).probability[0, 0].numpy()
        assert np.abs(got - ref).max() < 1e-3, steps


def test_the_torch_reference_runs_the_student_too(student_bundle):
    from diffiml.export.reference import open_reference

    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ref = open_reference(student_bundle, steps=2, ensemble=2, copy_move=False).localize(image).model_probability
    with Localizer.open(student_bundle, backend="ort-cpu", steps=2, ensemble=2, copy_move=False) as localizer:
        assert np.abs(localizer.localize(image).model_probability - ref).max() < 1e-3


def test_a_student_of_other_weights_is_refused(tiny_run, distilled, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(distilled / "steps-2" / "checkpoint", other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in weights if k.startswith("encoder.") and weights[k].is_floating_point())
    weights[name] = weights[name] + 1
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(ExportError, match="differ from the teacher"):
        export_bundle(tiny_run, tmp_path / "bundle", students=[other])
    with pytest.raises(ExportError, match="not a distilled checkpoint"):
        export_bundle(tiny_run, tmp_path / "bundle", students=[tiny_run])


def test_a_schedule_naming_a_missing_student_graph_is_refused(student_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(student_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["graphs"]["unet_k2"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unet_k2"):
        load_bundle(bad)


def test_fast_runs_the_student_and_is_refused_without_one(student_bundle, tiny_bundle, tmp_path, capsys):
    image = Path(__file__).resolve().parents[1] / "examples" / "sample_splice.png"
    assert main(["localize", str(image), "--bundle", str(student_bundle), "--out", str(tmp_path / "fast"),
                 "--fast", "--no-copy-move"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["members"] == 3
    assert main(["localize", str(image), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "none"),
                 "--fast"]) != 0
    assert "distilled UNet" in capsys.readouterr().err
    assert main(["localize", str(image), "--bundle", str(student_bundle), "--out", str(tmp_path / "both"),
                 "--fast", "--steps", "4"]) != 0


def test_a_student_shipped_as_its_unet_alone_exports_the_same_graph(student_bundle, tiny_run, distilled, tmp_path):
    """How the default model ships its student: only the UNet's tensors, the rest being the teacher's."""
    lean = tmp_path / "lean"
    shutil.copytree(distilled / "steps-2" / "checkpoint", lean)
    weights = load_file(str(lean / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k.startswith("unet.")}, str(lean / "model.safetensors"))
    manifest = export_bundle(tiny_run, tmp_path / "bundle", students=[lean])
    first = json.loads((student_bundle / "manifest.json").read_text())
    assert manifest["graphs"]["unet_k2"]["sha256"] == first["graphs"]["unet_k2"]["sha256"]
