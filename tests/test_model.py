import numpy as np
import pytest
import torch

from diffiml.constants import PRIOR_RATE
from diffiml.train.config import MIT_VARIANTS, ModelConfig, get_config
from diffiml.train.data.edges import edge_map
from diffiml.train.model import DiffIML, DiscriminativeBaseline


def test_condition_encoder_outputs_the_latent_grid_for_any_multiple_of_32():
    cfg = get_config("tiny")
    cfg.image_size = 96
    model = DiffIML(cfg).eval()
    assert model.encoder(torch.zeros(2, 3, 96, 96)).shape == (2, cfg.head_channels, 12, 12)


def test_image_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        ModelConfig(image_size=100)


def test_condition_split_equals_one_conv_on_the_concatenation():
    cfg = get_config("tiny")
    unet = DiffIML(cfg).unet
    h = torch.randn(1, cfg.unet_channels, 8, 8)
    c = torch.randn(1, cfg.head_channels, 8, 8)
    weight = torch.cat([unet.latent_entry.weight, unet.condition_entry.weight], dim=1)
    joint = torch.nn.functional.conv2d(torch.cat([h, c], 1), weight, padding=1)
    torch.testing.assert_close(unet.latent_entry(h) + unet.condition_features(c), joint, atol=1e-5, rtol=1e-5)


def test_loss_noises_the_target_with_the_error_prior():
    """What ``DiffIML.loss`` feeds its UNet: z_t - sqrt(a_t) z0 has variance a_t lambda^2 + (1 - a_t) (eq. 15), not
    the 1 - a_t of plain DDPM; at small t the difference is measurable."""
    torch.manual_seed(0)
    model = DiffIML(get_config("tiny")).eval()
    mask = (torch.rand(128, 1, 64, 64) > 0.5).float()
    edge = (torch.rand(128, 1, 64, 64) > 0.8).float()
    fed = []
    model.unet.register_forward_pre_hook(lambda _module, args: fed.append(args))
    model.loss(torch.randn(128, 3, 64, 64), mask, edge, generator=torch.Generator().manual_seed(1))
    z_t, t = fed[0][0], fed[0][1]
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    residual_var = (z_t - a.sqrt() * model.target_latents(mask, edge)).pow(2).mean(dim=(1, 2, 3))
    with_prior = (a * PRIOR_RATE**2 + 1 - a).flatten()
    small_t = t < 50
    assert small_t.sum() >= 2
    ratio = residual_var / with_prior
    assert ((ratio > 0.8) & (ratio < 1.25)).all()
    prior_var = ((residual_var - (1 - a.flatten())) / a.flatten())[small_t].mean()
    assert 0.6 * PRIOR_RATE**2 < prior_var < 1.4 * PRIOR_RATE**2  # plain DDPM would give about 0


def test_lightvae_stays_in_eval_mode_while_diffusion_trains():
    model = DiffIML(get_config("tiny")).train()
    assert not model.vae.training and model.encoder.training
    assert not any(p.requires_grad for p in model.vae.parameters())


def test_edge_map_is_a_band_around_the_mask_boundary():
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1
    edge = edge_map(mask)
    assert edge[32, 32] == 0 and edge[0, 0] == 0
    assert edge[16, 32] == 1 and edge[32, 47] == 1
    assert 4 <= edge[32, :].sum() <= 2 * 9  # two crossings, each about 7 wide


def test_losses_are_finite_and_positive():
    cfg = get_config("tiny")
    image, mask = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    for model in (DiffIML(cfg), DiscriminativeBaseline(cfg)):
        loss = model.loss(image, mask, mask, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and loss > 0


def test_resnet_backbone_option_gives_the_same_condition_shape():
    cfg = get_config("tiny")
    cfg.backbone = "resnet50"
    model = DiffIML(cfg).eval()
    with torch.no_grad():
        assert model.encoder(torch.zeros(1, 3, 64, 64)).shape == (1, cfg.head_channels, 8, 8)


def _layer_norm_eps(encoder: torch.nn.Module) -> list[float]:
    return sorted(m.eps for m in encoder.backbone.modules() if isinstance(m, torch.nn.LayerNorm))


def test_mit_block_and_stage_layernorms_use_the_configs_eps():
    """transformers ignores its own ``layer_norm_eps`` for these: without ``set_mit_layer_norm_eps`` all would
    keep torch's 1e-5. The patch-embedding and sequence-reduction norms keep 1e-5, as in the authors' MiT."""
    cfg = get_config("tiny")
    cfg.mit_layer_norm_eps = 1e-3  # no library's default: only the config can have put it there
    blocks, reduced = sum(MIT_VARIANTS["tiny"]["depths"]), sum(MIT_VARIANTS["tiny"]["depths"][:3])
    assert _layer_norm_eps(DiffIML(cfg).encoder) == [1e-5] * (4 + reduced) + [1e-3] * (2 * blocks + 4)


def test_paper_config_uses_the_authors_eps_and_older_checkpoints_keep_theirs():
    paper = get_config("paper")
    assert paper.mit_layer_norm_eps == 1e-6
    assert ModelConfig.from_json(paper.to_json()).mit_layer_norm_eps == 1e-6
    before = {k: v for k, v in get_config("tiny").to_json().items() if k != "mit_layer_norm_eps"}
    assert ModelConfig.from_json(before).mit_layer_norm_eps == 1e-5  # written before the field: trained with 1e-5
    assert set(_layer_norm_eps(DiffIML(ModelConfig.from_json(before)).encoder)) == {1e-5}


def test_lightvae_distills_from_a_local_sd_vae_teacher(tmp_path):
    """A (small, random) diffusers AutoencoderKL saved as a local folder stands in for sd-vae-ft-mse."""
    from diffusers import AutoencoderKL

    from diffiml.train.light_vae import LightVAE
    from diffiml.train.vae_distill import VaeDistillation, load_teacher

    AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  ).save_pretrained(tmp_path / "teacher")
    objective = VaeDistillation(LightVAE((8, 16, 32)), load_teacher(tmp_path / "teacher"))
    mask = (torch.rand(2, 1, 64, 64) > 0.5).float()
    loss = objective.loss(mask, mask, mask)
    loss.backward()
    assert torch.isfinite(loss) and not any(p.grad is not None for p in objective.teacher.parameters())
