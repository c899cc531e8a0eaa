import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffiml.train.checkpoint import load_weights, save_checkpoint
from diffiml.train.config import get_config
from diffiml.train.data.dataset import ForgeryDataset
from diffiml.train.data.readers import read_dataset
from diffiml.train.model import DiffIML
from diffiml.train.trainer import TrainOptions, train


def _dataset(synthetic_set):
    return ForgeryDataset(read_dataset(synthetic_set / "train.json"), 64, train=True, seed=0)


def test_a_few_training_steps_lower_the_loss(synthetic_set, tmp_path):
    torch.manual_seed(0)
    model = DiffIML(get_config("tiny"))
    one_batch = ForgeryDataset(read_dataset(synthetic_set / "train.json")[:4], 64, train=False)
    losses = train(model, one_batch, tmp_path, {"kind": "diffiml"}, TrainOptions(steps=30, batch_size=4, lr=1e-3))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_checkpoint_round_trip_is_exact_and_never_pickled(tmp_path):
    model = DiffIML(get_config("tiny"))
    save_checkpoint(tmp_path, model, {"kind": "diffiml", "model": get_config("tiny").to_json()})
    other = DiffIML(get_config("tiny"))
    load_weights(tmp_path, other)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["config.json", "model.safetensors"]
    load_file(str(tmp_path / "checkpoint" / "model.safetensors"))  # plain safetensors


def test_resume_continues_exactly_where_a_stopped_run_ended(synthetic_set, tmp_path):
    opts = dict(steps=4, batch_size=2, lr=1e-3, checkpoint_every=100)
    torch.manual_seed(0)
    straight = train(DiffIML(get_config("tiny")), _dataset(synthetic_set), tmp_path / "a", {}, TrainOptions(**opts))
    torch.manual_seed(0)
    first = train(DiffIML(get_config("tiny")), _dataset(synthetic_set), tmp_path / "b", {},
                  TrainOptions(**opts, stop_after=2))
    assert json.loads((tmp_path / "b/checkpoint/trainer_state.json").read_text())["step"] == 2
    rest = train(DiffIML(get_config("tiny")), _dataset(synthetic_set), tmp_path / "b", {}, TrainOptions(**opts),
                 resume=True)
    assert first + rest == pytest.approx(straight, rel=1e-5)
    a = load_file(str(tmp_path / "a/checkpoint/model.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoint/model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cli_refuses_to_overwrite_a_run_without_resume(tiny_run, synthetic_set, capsys):
    from diffiml.cli import main

    code = main(["train", "--config", "tiny", "--data", str(synthetic_set / "train.json"), "--out", str(tiny_run)])
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_two_process_ddp_smoke_run(synthetic_set, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffiml.train",
           "--config", "tiny", "--data", str(synthetic_set / "train.json"), "--out", str(tmp_path / "ddp"),
           "--steps", "2", "--batch-size", "2", "--baseline"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads((tmp_path / "ddp/checkpoint/trainer_state.json").read_text())
    assert state == {**state, "step": 2, "world_size": 2}


def test_a_new_model_reuses_the_lightvae_of_a_diffiml_checkpoint(tmp_path):
    from diffiml.train.checkpoint import load_lightvae, save_checkpoint
    from diffiml.train.config import get_config
    from diffiml.train.light_vae import LightVAE
    from diffiml.train.model import DiffIML

    config = get_config("tiny")
    source = DiffIML(config)
    save_checkpoint(tmp_path / "run", source, {"kind": "diffiml", "model": config.to_json()})
    vae = LightVAE(config.vae_channels)
    load_lightvae(tmp_path / "run", vae)
    for key, value in source.vae.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key
    with pytest.raises(ValueError, match="does not fit"):
        load_lightvae(tmp_path / "run", LightVAE([4, 8, 16]))
