"""The self-correlation stage of the condition encoder: what it sees, and that it starts as a no-op."""

import dataclasses

import pytest
import torch

from diffiml.train.checkpoint import CheckpointError, load_warm_start, save_checkpoint
from diffiml.train.condition_encoder import ConditionEncoder
from diffiml.train.config import get_config
from diffiml.train.model import DiffIML
from diffiml.train.self_correlation import SelfCorrelation, neighbourhood


def _copied_features(grid: int = 8, channels: int = 24) -> torch.Tensor:
    torch.manual_seed(0)
    f = torch.randn(1, channels, grid, grid)
    f[:, :, 5:7, 4:7] = f[:, :, 1:3, 0:3]  # a 2x3 block copied 4 cells down and 4 right
    return f


def test_a_copied_block_matches_its_source_and_nothing_else_matches_well():
    stage = SelfCorrelation(8, topk=4, exclude=1)
    sim = stage.similarity(_copied_features())[0]
    best = sim.max(dim=1).values.reshape(8, 8)
    assert torch.allclose(best[5:7, 4:7], torch.ones(2, 3), atol=1e-5)
    assert torch.allclose(best[1:3, 0:3], torch.ones(2, 3), atol=1e-5)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[5:7, 4:7] = outside[1:3, 0:3] = False
    assert best[outside].max() < 0.9


def test_the_weighted_offset_points_from_copy_to_source():
    stage = SelfCorrelation(8, topk=4, exclude=1, temperature=0.01)
    f = _copied_features()
    values, indices = torch.topk(stage.similarity(f), 4, dim=2)
    g = 8
    partner = torch.stack([torch.div(indices, g, rounding_mode="floor"), indices % g], dim=1)
    copy = 5 * g + 4
    assert partner[0, :, copy, 0].tolist() == [1, 0]  # the best match of the copy's corner is the source's corner


def test_a_position_never_matches_its_own_neighbourhood():
    near = neighbourhood(6, 2)
    assert near.shape == (36, 36) and near.diagonal().all()
    assert near[0, 2 * 6 + 2] and not near[0, 3]  # (0,0)-(2,2) within 2 cells; (0,0)-(0,3) not
    stage = SelfCorrelation(6, topk=4, exclude=2)
    smooth = torch.linspace(0, 1, 36).reshape(1, 1, 6, 6).repeat(1, 4, 1, 1) + torch.randn(1, 4, 6, 6) * 1e-3
    sim = stage.similarity(smooth)[0]
    assert (sim[near] < -1.9).all() and (sim[~near] >= -1.0001).all()


def test_fine_queries_exclude_the_coarse_cell_that_holds_them_and_its_neighbours():
    near = neighbourhood(4, 1, query_grid=8)
    assert near.shape == (64, 16)
    assert near[0].reshape(4, 4)[:2, :2].all() and not near[0].reshape(4, 4)[2:, :].any()
    assert near[18].reshape(4, 4)[:3, :3].all() and not near[18].reshape(4, 4)[3].any()  # (2,2) is in cell (1,1)
    stage = SelfCorrelation(4, topk=2, exclude=1, query_grid=8)
    torch.manual_seed(0)
    keys = torch.randn(1, 6, 4, 4)
    queries = torch.nn.functional.interpolate(keys, size=(8, 8), mode="nearest")
    queries[:, :, 6:8, 6:8] = keys[:, :, 0:1, 0:1]  # the query cell (3,3) at 1/16 copies key cell (0,0)
    best = stage.similarity(queries, keys)[0].argmax(dim=1).reshape(8, 8)
    assert (best[6:8, 6:8] == 0).all()
    assert stage(queries, keys).shape == (1, 32, 8, 8)


def test_too_few_positions_for_top_k_is_refused():
    with pytest.raises(ValueError, match="top-30"):
        SelfCorrelation(6, topk=30, exclude=2)


def test_the_zero_initialised_projection_starts_as_the_encoder_without_the_stage():
    base = dataclasses.replace(get_config("tiny"), self_correlation=False)
    without = ConditionEncoder(base).eval()
    with_stage = ConditionEncoder(get_config("tiny")).eval()
    missing, unexpected = with_stage.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("correlation") for k in missing)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(with_stage(image), without(image))
        torch.nn.init.normal_(with_stage.correlation_proj.weight, std=0.1)
        assert not torch.allclose(with_stage(image), without(image), atol=1e-3)  # wired in: it changes the output


def test_warm_start_loads_a_checkpoint_without_the_stage_and_refuses_other_shapes(tmp_path):
    base = dataclasses.replace(get_config("tiny"), self_correlation=False)
    old = DiffIML(base)
    save_checkpoint(tmp_path / "old", old, {"kind": "diffiml", "model": base.to_json()})
    new = DiffIML(get_config("tiny"))
    fresh = load_warm_start(tmp_path / "old", new)
    assert fresh and all(".correlation" in k for k in fresh)
    assert torch.equal(new.unet.conv_in.weight, old.unet.conv_in.weight)
    wider = DiffIML(dataclasses.replace(get_config("tiny"), head_channels=48))
    with pytest.raises(CheckpointError, match="other shape"):
        load_warm_start(tmp_path / "old", wider)
