"""The offline ImageNet MobileNetV2: its file is checked before it is read, and its weights are really in use."""

import cv2
import numpy as np
import pytest
import torch

from diffiml.constants import IMAGE_MEAN, IMAGE_STD
from diffiml.train.config import ModelConfig, get_config
from diffiml.train.mobilenet import MobileNetV2, PretrainedWeightsError, bundled_weights_path, load_imagenet_weights

ESPRESSO, EGYPTIAN_CAT, TABBY, TIGER_CAT = 967, 285, 281, 282


def _imagenet_input(rgb: np.ndarray) -> torch.Tensor:
    x = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())


@pytest.fixture(scope="module")
def imagenet_mobilenet() -> MobileNetV2:
    try:
        bundled_weights_path()
    except PretrainedWeightsError as exc:
        pytest.skip(str(exc))
    net = MobileNetV2()
    load_imagenet_weights(net)
    return net.eval()


def test_pretrained_mobilenet_recognizes_scikit_image_photos(imagenet_mobilenet):
    from skimage import data

    with torch.no_grad():
        coffee = imagenet_mobilenet(_imagenet_input(data.coffee())).argmax(-1).item()
        cat = imagenet_mobilenet(_imagenet_input(data.chelsea())).topk(3).indices[0].tolist()
    assert coffee == ESPRESSO
    assert cat[0] in (EGYPTIAN_CAT, TABBY, TIGER_CAT) and set(cat) <= {EGYPTIAN_CAT, TABBY, TIGER_CAT}


def test_random_mobilenet_does_not_recognize_them():
    """The control of the test above: the same network without the file ranks the photo anywhere."""
    from skimage import data

    torch.manual_seed(0)
    with torch.no_grad():
        assert MobileNetV2().eval()(_imagenet_input(data.coffee())).argmax(-1).item() != ESPRESSO


def test_a_file_with_another_sha256_is_refused_before_it_is_read(tmp_path):
    fake = tmp_path / "mobilenet_v2.pth"
    torch.save(MobileNetV2().state_dict(), fake)
    with pytest.raises(PretrainedWeightsError, match="sha256"):
        load_imagenet_weights(MobileNetV2(), fake)
    with pytest.raises(PretrainedWeightsError, match="no such"):
        load_imagenet_weights(MobileNetV2(), tmp_path / "missing.pth")


def test_encoder_built_with_imagenet_weights_holds_them_and_drops_the_classifier(imagenet_mobilenet):
    from diffiml.train.condition_encoder import BUNDLED_IMAGENET, ConditionEncoder

    config = ModelConfig.from_json({**get_config("mobile").to_json(), "image_size": 128})
    encoder = ConditionEncoder(config, pretrained=BUNDLED_IMAGENET)
    first = encoder.backbone.features[0][0].weight
    assert torch.equal(first, imagenet_mobilenet.features[0][0].weight)
    assert not any(k.startswith("backbone.classifier") for k in encoder.state_dict())
    out = encoder(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, config.head_channels, 16, 16)
