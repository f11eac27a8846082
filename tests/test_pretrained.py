"""Pretrained and frozen backbones: weights files of every origin, timm by name, freezing, and the
input (size, normalisation) the weights expect. No test downloads: weight files are made here."""

import pytest
import torch
from safetensors.torch import save_file

from mtl_unsup.config import ConfigValueError
from mtl_unsup.inference import load_checkpoint, model_from_checkpoint, predict_images
from mtl_unsup.models.backbones import ConfigError, SmallCNN, TorchvisionBackbone, expected_input
from mtl_unsup.models.timm_backbone import TimmBackbone
from mtl_unsup.models.weights import WeightsError
from mtl_unsup.train import build_run, train

from .conftest import compose_cfg, tiny_folder_overrides


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def files_of_every_origin(source: SmallCNN, tmp_path):
    """The same backbone weights as mtl-unsup, Lightning, solo-learn, DDP and timm write them."""
    own = source.state_dict()
    head = {"weight": torch.zeros(3, source.feature_dim), "bias": torch.zeros(3)}
    layouts = {
        "mtl_unsup.ckpt": {"state_dict": {**{f"backbone.{k}": v for k, v in own.items()},
                                          **{f"tasks.cluster.head.{k}": v for k, v in head.items()}},
                           "mtl_config": {"data": {"image_size": 20, "mean": [0.1], "std": [0.2]}}},
        "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in own.items()}, "epoch": 3},
        "solo_learn.ckpt": {"state_dict": {**{f"backbone.{k}": v for k, v in own.items()},
                                           **{f"projector.0.{k}": v for k, v in head.items()},
                                           **{f"classifier.{k}": v for k, v in head.items()}}},
        "ddp.pth": {"model": {f"module.{k}": v for k, v in own.items()}},
        "plain_with_fc.pt": {**own, **{f"fc.{k}": v for k, v in head.items()}},
    }
    paths = []
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        paths.append(tmp_path / name)
    save_file({**own, **{f"head.{k}": v for k, v in head.items()}}, str(tmp_path / "timm.safetensors"))
    return [*paths, tmp_path / "timm.safetensors"]


def test_weights_load_whoever_saved_them(tmp_path):
    source = SmallCNN(1, (4, 8))
    for path in files_of_every_origin(source, tmp_path):
        loaded = SmallCNN(1, (4, 8), weights_path=str(path))
        assert same_weights(loaded, source), path.name
        assert path.name in loaded.weights and "sha256" in loaded.weights


def test_a_mismatch_names_the_missing_and_the_unexpected_keys(tmp_path):
    own = SmallCNN(1, (4, 8)).state_dict()
    state = {k: v for k, v in own.items() if not k.startswith("net.1.")}  # one BatchNorm lost
    state["net.9.weight"] = torch.zeros(3)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "w.ckpt")
    with pytest.raises(WeightsError) as err:
        SmallCNN(1, (4, 8), weights_path=str(tmp_path / "w.ckpt"))
    message = str(err.value)
    assert "prefix 'backbone.'" in message
    assert "missing key(s) ['net.1.weight'" in message and "unexpected key(s) ['net.9.weight']" in message


def test_timm_models_by_name_with_their_weights_file(tmp_path):
    rgb = TimmBackbone("test_resnet", in_channels=3)
    assert rgb(torch.rand(2, 3, 32, 32)).shape == (2, rgb.feature_dim)
    # timm's own .safetensors, classifier included, into a one-channel model: RGB filters summed
    full = {**rgb.model.state_dict(), "fc.weight": torch.zeros(5, rgb.feature_dim)}
    save_file(full, str(tmp_path / "model.safetensors"))
    grey = TimmBackbone("test_resnet", in_channels=1, weights_path=str(tmp_path / "model.safetensors"))
    x = torch.rand(2, 1, 32, 32)
    rgb.eval(), grey.eval()
    assert torch.allclose(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)
    vit = TimmBackbone("test_vit", in_channels=3)
    assert vit(torch.rand(1, 3, 160, 160)).shape == (1, vit.feature_dim)
    with pytest.raises(ConfigError, match=r"backbone.name='resnet_nonsense' is not a timm model.*resnet"):
        TimmBackbone("resnet_nonsense")


def test_a_cifar_stem_keeps_its_own_first_conv_over_imagenet_weights(tmp_path):
    imagenet = TorchvisionBackbone("resnet18")
    torch.save(imagenet.model.state_dict(), tmp_path / "r18.pth")
    cifar = TorchvisionBackbone("resnet18", cifar_stem=True, weights_path=str(tmp_path / "r18.pth"))
    assert cifar.model.conv1.kernel_size == (3, 3)
    assert torch.equal(cifar.model.layer4[1].conv2.weight, imagenet.model.layer4[1].conv2.weight)


@pytest.mark.parametrize("make", [lambda: SmallCNN(1, (4, 8), freeze=True),
                                  lambda: TimmBackbone("test_resnet", in_channels=1, freeze=True)])
def test_a_frozen_backbone_neither_learns_nor_updates_batchnorm(make):
    net = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    net(torch.rand(8, 1, 32, 32))  # in training mode BatchNorm would update its statistics
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_the_input_comes_from_the_weights_unless_set(tmp_path, shapes_dir):
    timm_cfg = {"_target_": "mtl_unsup.models.timm_backbone.TimmBackbone", "name": "resnet18.a1_in1k",
                "pretrained": True}
    seen = expected_input(timm_cfg, channels=3)  # timm's pretrained config: nothing is fetched
    assert seen["image_size"] == 224 and seen["mean"] == pytest.approx([0.485, 0.456, 0.406])
    plain = {"image_size": 32, "mean": 0.5, "std": 0.25}
    assert expected_input({**timm_cfg, "pretrained": False}, 3) == plain
    tv = expected_input({"_target_": "mtl_unsup.models.backbones.TorchvisionBackbone", "name": "resnet18",
                         "pretrained": True}, channels=1)
    assert tv["image_size"] == 224 and tv["mean"] == pytest.approx([0.449])
    # weights trained by mtl-unsup bring the input of the run that trained them
    source = SmallCNN(1, (8, 16), convs_per_stage=1)
    path = files_of_every_origin(source, tmp_path)[0]
    base = [o for o in tiny_folder_overrides(shapes_dir)
            if not o.startswith(("data.image_size", "data.mean"))]
    run = build_run(compose_cfg(tmp_path / "a", [*base, f"backbone.weights_path={path}"]))
    assert (run.datamodule.image_size, run.datamodule.mean) == (20, [0.1])
    run = build_run(compose_cfg(tmp_path / "b", [*base, f"backbone.weights_path={path}",
                                                 "data.image_size=12"]))
    assert (run.datamodule.image_size, run.datamodule.mean) == (12, [0.1])  # the user's wins


@pytest.mark.parametrize("cached", [True, False])
def test_a_frozen_run_trains_heads_only_and_predicts_like_any_other(tmp_path, shapes_dir, cached):
    source = SmallCNN(1, (8, 16), convs_per_stage=1)
    torch.save(source.state_dict(), tmp_path / "pretrained.pt")
    weights = tmp_path / "pretrained.pt"
    overrides = [*tiny_folder_overrides(shapes_dir), f"backbone.weights_path={weights}",
                 "backbone.freeze=true", "task=[cluster,scan,contrastive]", "task.scan.num_neighbors=3",
                 "task.scan.start_epoch=0", "task.scan.num_heads=2", f"data.embedding_cache={cached}",
                 "data.embedding_copies=2", f"paths.cache_dir={tmp_path / 'cache'}"]
    run = build_run(compose_cfg(tmp_path / "probe", overrides))
    optimizer = run.module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained and not trained & {id(p) for p in run.module.backbone.parameters()}
    out = tmp_path / "run"
    metrics = train(compose_cfg(out, overrides))
    # the three shapes are apart in the frozen features (read from the cache or not), and the
    # heads trained on them do better than chance (3 classes)
    assert metrics["test/kmeans_acc"] >= 0.9 and metrics["test/acc"] > 1 / 3
    assert (tmp_path / "cache" / "embeddings").is_dir() == cached
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["backbone_weights"]["frozen"] and "pretrained.pt" in ckpt["backbone_weights"]["start"]
    module, cfg = model_from_checkpoint(out / "checkpoints" / "last.ckpt")
    assert same_weights(module.backbone, source)  # weights and BatchNorm statistics as loaded
    heads = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("tasks.scan.")}
    assert heads and any(v.abs().sum() > 0 for v in heads.values())
    preds = predict_images(module, cfg, run.datamodule.splits["test"], progress=False)
    assert preds.features.shape == (len(run.datamodule.splits["test"]), source.feature_dim)


def test_cached_features_are_the_backbones_and_are_computed_once(tmp_path, shapes_dir, caplog):
    torch.save(SmallCNN(1, (8, 16), convs_per_stage=1).state_dict(), tmp_path / "w.pt")
    overrides = [*tiny_folder_overrides(shapes_dir), f"backbone.weights_path={tmp_path / 'w.pt'}",
                 "backbone.freeze=true", "task=[cluster,contrastive]", "data.embedding_copies=3",
                 f"paths.cache_dir={tmp_path / 'cache'}"]
    run = build_run(compose_cfg(tmp_path / "a", overrides))
    train_rows = run.datamodule._dataset("train")
    images = run.datamodule._image_dataset("train")
    assert train_rows.features.shape == (len(images), 1 + 2 * 3, 16)  # plain, 3 weak, 3 strong
    x = torch.stack([images[i]["image"] for i in range(len(images))])
    plain = run.module.backbone.eval()((x - 0.3) / 0.4)
    assert torch.allclose(torch.from_numpy(train_rows.features[:, 0].astype("float32")), plain,
                          atol=1e-2, rtol=1e-2)  # float16
    copies = torch.from_numpy(train_rows.features[:, 1:4].astype("float32"))
    assert (copies - plain[:, None]).abs().mean() > 1e-3  # augmented copies differ from the plain
    held_out = run.datamodule._dataset("test").features
    assert held_out.shape[1] == 1  # no copies of held-out images
    files = sorted((tmp_path / "cache" / "embeddings").rglob("*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = build_run(compose_cfg(tmp_path / "b", overrides))  # read back, not computed again
    assert (again.datamodule._dataset("train").features == train_rows.features).all()
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # a damaged entry (cut short) is computed again, with a warning, and gives the same rows
    entry = next(f for f in files if f.name.startswith("train"))
    damaged = entry.read_bytes()[:200]
    entry.unlink()  # a new file: the runs above still map the old one (cut in place, it would SIGBUS them)
    entry.write_bytes(damaged)
    with caplog.at_level("WARNING"):
        mended = build_run(compose_cfg(tmp_path / "d", overrides)).datamodule._dataset("train")
    assert f"The cached features {entry} are damaged (200 bytes" in caplog.text
    assert (mended.features == train_rows.features).all()
    # other weights are other features: a new key
    torch.save(SmallCNN(1, (8, 16), convs_per_stage=1).state_dict(), tmp_path / "w.pt")
    build_run(compose_cfg(tmp_path / "c", overrides)).datamodule._dataset("test")
    assert len(list((tmp_path / "cache" / "embeddings").iterdir())) == 2


def test_an_image_task_with_cached_features_is_refused_naming_the_fix(tmp_path, shapes_dir):
    overrides = [*tiny_folder_overrides(shapes_dir), "backbone.freeze=true", "task=[cluster,rotation]",
                 f"paths.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ConfigValueError, match=r"task.rotation works on images.*data.embedding_cache=false"):
        build_run(compose_cfg(tmp_path, overrides))
