import torch

from diffiml.train.config import get_config
from diffiml.train.model import DiffIML
from diffiml.train.sampler import sample


def test_reference_sampler_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    model = DiffIML(get_config("tiny"))
    image = torch.randn(2, 3, 64, 64)
    a = sample(model, image, steps=4, ensemble=3, seed=5)
    b = sample(model, image, steps=4, ensemble=3, seed=5)
    c = sample(model, image, steps=4, ensemble=3, seed=6)
    assert a.probability.shape == (2, 1, 64, 64)
    torch.testing.assert_close(a.probability, b.probability, rtol=0, atol=0)
    assert not torch.equal(a.probability, c.probability)


def test_an_image_gets_the_same_mask_alone_or_in_a_batch():
    torch.manual_seed(0)
    model = DiffIML(get_config("tiny"))
    image = torch.randn(3, 3, 64, 64)
    batch = sample(model, image, steps=2, ensemble=2, seed=1).probability
    alone = sample(model, image[1:2], steps=2, ensemble=2, seed=1).probability
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)


def test_flip_tta_merges_by_max_and_members_are_returned():
    torch.manual_seed(0)
    model = DiffIML(get_config("tiny"))
    out = sample(model, torch.randn(1, 3, 64, 64), steps=2, ensemble=2, seed=0, tta=True, members=True)
    assert out.member_probability.shape == (1, 4, 64, 64)
    plain = sample(model, torch.randn(1, 3, 64, 64), steps=2, ensemble=2, seed=0).probability
    assert out.probability.shape == plain.shape
