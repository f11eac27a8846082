import pytest
import torch

from mtl_unsup.models.backbones import ConfigError, SmallCNN, TorchvisionBackbone
from mtl_unsup.models.weights import WeightsError


def test_small_cnn_exposes_its_feature_dim_for_any_small_size():
    net = SmallCNN(in_channels=1, widths=(8, 16, 32))
    for size in (8, 16, 28):
        assert net(torch.rand(2, 1, size, size)).shape == (2, net.feature_dim) == (2, 32)


def test_torchvision_resnet_with_cifar_stem_and_one_channel():
    net = TorchvisionBackbone("resnet18", in_channels=1, cifar_stem=True)
    assert net.feature_dim == 512
    assert net.model.conv1.kernel_size == (3, 3) and net.model.conv1.stride == (1, 1)
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 512)


def test_any_torchvision_classifier_by_name():
    net = TorchvisionBackbone("mobilenet_v3_small", in_channels=3)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, net.feature_dim)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ConfigError, match=r"backbone.name='resnet1000'.*resnet18"):
        TorchvisionBackbone("resnet1000")


def test_local_weights_load_and_mismatches_are_named(tmp_path):
    source = SmallCNN(1, (4, 8))
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = SmallCNN(1, (4, 8), weights_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    with pytest.raises(WeightsError, match="does not fit backbone SmallCNN.*wrong shape"):
        SmallCNN(1, (4, 16), weights_path=str(path))
    with pytest.raises(WeightsError, match="does not exist"):
        SmallCNN(1, (4, 8), weights_path=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="is not a weights file"):
        SmallCNN(1, (4, 8), weights_path=str(tmp_path / "junk.pt"))


def test_pretrained_resnet_weights_are_used(tmp_path):
    source = TorchvisionBackbone("resnet18")
    path = tmp_path / "r18.pt"
    torch.save(source.model.state_dict(), path)
    loaded = TorchvisionBackbone("resnet18", weights_path=str(path))
    assert torch.equal(loaded.model.conv1.weight, source.model.conv1.weight)


def test_pretrained_rgb_filters_carry_over_to_greyscale(tmp_path):
    source = TorchvisionBackbone("resnet18")
    path = tmp_path / "r18.pt"
    torch.save(source.model.state_dict(), path)
    grey = TorchvisionBackbone("resnet18", in_channels=1, weights_path=str(path))
    assert torch.allclose(grey.model.conv1.weight, source.model.conv1.weight.sum(1, keepdim=True))
    x = torch.rand(1, 1, 64, 64)  # a grey image seen as RGB gives the same features
    source.eval(), grey.eval()
    assert torch.allclose(grey(x), source(x.expand(-1, 3, -1, -1)), atol=1e-4)
