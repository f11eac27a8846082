"""The field's recipes as tasks: neighbours (SCAN), self-labelling, balanced assignment,
overclustering; several clustering heads in one model, the answer chosen without labels."""

import re

import pytest
import torch

from mtl_unsup.clustering.kmeans import ClusterState
from mtl_unsup.clustering.refresh import ClusterSettings, RefreshContext, balanced_state, cluster_shares
from mtl_unsup.clustering.sinkhorn import sinkhorn
from mtl_unsup.config import ConfigValueError, check_config
from mtl_unsup.errors import UserError
from mtl_unsup.inference import model_from_checkpoint
from mtl_unsup.metrics import many_to_one_accuracy, reads_labels, score_clustering
from mtl_unsup.tasks import ClusterTask, RotationTask
from mtl_unsup.tasks.scan import scan_loss
from mtl_unsup.tasks.selflabel import confident_targets
from mtl_unsup.train import build_run, build_tasks, train

from .conftest import compose_cfg, tiny_folder_overrides
from .test_selection import permute_labels


def blobs(sizes, dim=8, spread=0.05, seed=0):
    """Well separated gaussian blobs of the given sizes, and their true labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[: len(sizes)] * 3
    noise = [spread * torch.randn(n, dim, generator=g) for n in sizes]
    x = torch.cat([c + e for c, e in zip(centres, noise, strict=True)])
    return x, torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])


def context(features, **settings):
    return RefreshContext(features, epoch=0, seed=0, settings=ClusterSettings(pca_dim=None, **settings))


def test_neighbours_are_the_nearest_others_never_the_image_itself():
    x, labels = blobs([30, 30, 30])
    found = context(x).neighbours(5)
    assert found.shape == (90, 5)
    assert not (found == torch.arange(90).unsqueeze(1)).any()
    assert (labels[found] == labels.unsqueeze(1)).all()  # all in the image's own blob
    z = torch.nn.functional.normalize(x - x.mean(0), dim=1)  # the whitened space without PCA
    sims = z @ z.t()
    sims.fill_diagonal_(-2)
    expected = sims.topk(5, dim=1).values
    assert torch.allclose(sims.gather(1, found).sort(1, descending=True).values, expected, atol=1e-5)


def test_min_size_marginals_recover_an_imbalanced_set_that_uniform_ones_break():
    x, truth = blobs([600, 300, 100])
    acc = {}
    for marginals in ("uniform", "min_size", "none"):
        state = context(x, assign="sinkhorn", marginals=marginals, min_size=0.25).pseudo_labels(3)
        acc[marginals] = score_clustering(state.labels, truth)["acc"]
    assert acc["none"] > 0.99 and acc["min_size"] > 0.99  # the true sizes are allowed
    assert acc["uniform"] < 0.8  # equal clusters must cut the big blob


def test_uniform_marginals_give_equal_clusters_even_from_a_degenerate_clustering():
    x, _ = blobs([100, 100, 100])
    z = torch.nn.functional.normalize(x - x.mean(0), dim=1)
    # two centroids on one blob, one between the others: nearest-centroid gives 50/50/200
    centroids = torch.stack([z[:100].mean(0) + 0.01, z[:100].mean(0) - 0.01, z[100:].mean(0)])
    degenerate = ClusterState(torch.cdist(z, centroids).argmin(1), centroids, x.mean(0), torch.eye(8))
    assert torch.bincount(degenerate.labels).max() == 200
    balanced = balanced_state(degenerate, z, ClusterSettings(assign="sinkhorn", marginals="uniform"))
    assert torch.bincount(balanced.labels).tolist() == [100, 100, 100]  # exactly, after rounding
    # the soft assignment's argmax alone is far from it (what exact rounding is for)
    q = sinkhorn(-torch.cdist(z, centroids).pow(2), 0.05)
    assert torch.bincount(q.argmax(1), minlength=3).max() > 140


def test_min_size_shares_raise_small_clusters_to_the_floor():
    shares = cluster_shares(torch.tensor([600, 300, 100]), "min_size", 0.5)
    assert shares.sum().item() == pytest.approx(1.0)
    assert shares[2].item() == pytest.approx(0.5 / 3)
    assert shares[0] / shares[1] == pytest.approx(2.0)  # the others keep their proportions
    assert cluster_shares(torch.tensor([5, 5]), "none", 0.5) is None


def test_scan_loss_rewards_agreeing_neighbours_and_using_every_cluster():
    sure = torch.eye(4)[torch.tensor([0, 1, 2, 3])] * 10
    other = torch.eye(4)[torch.tensor([1, 2, 3, 0])] * 10
    assert scan_loss(sure, sure, 0.0) < scan_loss(sure, other, 0.0) - 5
    collapsed = torch.eye(4)[torch.zeros(4, dtype=torch.long)] * 10
    assert scan_loss(sure, sure, 1.0) < scan_loss(collapsed, collapsed, 1.0) - 1


def test_self_labels_never_stall_and_the_fallback_favours_no_cluster():
    probs = torch.tensor([[0.995, 0.005], [0.2, 0.8], [0.4, 0.6], [0.45, 0.55], [0.3, 0.7], [0.9, 0.1]])
    assert confident_targets(probs, 0.99, 0.0).tolist() == [True, False, False, False, False, False]
    chosen = confident_targets(probs, 0.99, 0.5)  # 3 wanted: the most confident of each cluster
    assert int(chosen.sum()) >= 3
    predicted = probs.argmax(1)[chosen]
    assert set(predicted.tolist()) == {0, 1}
    assert chosen[1] and chosen[0]  # each cluster's most confident row
    nobody = torch.full((8, 4), 0.25)
    assert confident_targets(nobody, 0.99, 0.25).sum() >= 2


def test_many_to_one_accuracy_maps_each_cluster_to_its_majority_class():
    preds, target = torch.tensor([0, 0, 1, 1, 2, 2, 3]), torch.tensor([0, 0, 0, 0, 1, 1, 0])
    assert many_to_one_accuracy(preds, target) == 1.0  # four clusters, two classes: all pure
    assert score_clustering(preds, target, num_clusters=4)["acc_m2o"] == 1.0
    assert "acc_m2o" not in score_clustering(preds[:6], torch.tensor([0, 0, 1, 1, 0, 0]), 2)
    assert score_clustering(preds, target)["acc"] < 1.0


def test_stop_epoch_ends_a_task_and_must_follow_its_start():
    task = RotationTask(start_epoch=2, stop_epoch=5)
    assert [task.active(e) for e in (1, 2, 4, 5)] == [False, True, True, False]
    with pytest.raises(ValueError, match="stop_epoch=2 must be above start_epoch=2"):
        ClusterTask(start_epoch=2, stop_epoch=2)


RECIPE = ["task=[cluster,rotation,scan,selflabel,overcluster]", "task.scan.start_epoch=0",
          "task.scan.num_neighbors=3", "task.scan.num_heads=3", "task.selflabel.start_epoch=1",
          "task.selflabel.threshold=0.5", "task.overcluster.start_epoch=0", "task.overcluster.k_factor=2",
          "trainer.max_epochs=2", "trainer.deterministic=true"]


def test_several_recipes_train_together_and_the_answer_is_chosen_without_labels(
        shapes_dir, tmp_path, monkeypatch, capsys):
    overrides = [*tiny_folder_overrides(shapes_dir), *RECIPE]
    plain = train(compose_cfg(tmp_path / "a", overrides))
    out = capsys.readouterr().out
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    losses = ckpt["state_dict"]["tasks.scan.head_losses"]
    # SCAN's stage, its lowest-loss head; in two tiny epochs SCAN's heads fall apart (one cluster),
    # so they are no answer, and the k-means head answers
    usable = ckpt["task_states"]["scan"]["usable"]
    assert ckpt["answer"] == (f"scan_h{int(losses.argmin())}" if usable else "cluster")
    assert f"answer:     {ckpt['answer']} (of 5 clustering heads" in out
    n = len(ckpt["task_states"]["cluster"]["labels"])
    assert ckpt["task_states"]["scan"]["neighbours"].shape == (n, 3)
    assert ckpt["task_states"]["overcluster"]["centroids"].shape[0] == 6
    for head in ("cluster", "scan_h0", "scan_h2", "overcluster"):
        assert f"test/{head}/acc" in plain
    assert 0 < plain["test/overcluster/acc_m2o"] <= 1  # 6 clusters for 3 classes: many-to-one ACC too
    assert plain["test/acc"] == plain[f"test/{ckpt['answer']}/acc"]
    header = (tmp_path / "a" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/selflabel_confident" in header and "train/loss_scan" in header

    permute_labels(monkeypatch)
    shuffled = train(compose_cfg(tmp_path / "b", overrides))
    assert any(plain[k] != shuffled[k] for k in plain if reads_labels(k))  # they changed reports only
    again = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert again["answer"] == ckpt["answer"]
    assert all(torch.equal(again["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    assert torch.equal(again["task_states"]["scan"]["neighbours"], ckpt["task_states"]["scan"]["neighbours"])

    module, _ = model_from_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert module.answer() == ckpt["answer"]
    assert torch.equal(module.tasks["scan"].neighbours, ckpt["task_states"]["scan"]["neighbours"])


@pytest.mark.parametrize(("override", "says"), [
    ("cluster.answer=scan", "cluster.answer='scan' is not a clustering head"),
    ("task.selflabel.source=rotation", "task.selflabel: source='rotation' is not a task with a clustering"),
    ("cluster.assign=balanced", "cluster.assign='balanced' is not one of kmeans, sinkhorn"),
    ("task.scan.num_heads=0", "task.scan: num_neighbors=20 and num_heads=0 must be >= 1"),
    ("task.scan.num_neighbors=50", "task.scan.num_neighbors=50 needs more training images than the 42"),
])
def test_recipe_mistakes_stop_before_training_naming_the_key(shapes_dir, tmp_path, override, says):
    overrides = [*tiny_folder_overrides(shapes_dir), "task=[cluster,rotation,scan,selflabel]", override]
    if override.startswith("task.selflabel"):
        overrides[-2] = "task=[cluster,rotation,selflabel]"
    with pytest.raises(UserError, match=says.replace("(", r"\(").replace("[", r"\[")):
        build_run(compose_cfg(tmp_path, overrides))


def test_an_overclustering_head_larger_than_the_training_set_stops_the_run(shapes_dir, tmp_path):
    overrides = [*tiny_folder_overrides(shapes_dir), "task=[cluster,overcluster]",
                 "task.overcluster.k_factor=20"]
    with pytest.raises(UserError, match="The overcluster head has 60 clusters, more than the 42 training"):
        build_run(compose_cfg(tmp_path, overrides))


def test_a_named_answer_overrides_the_automatic_choice(shapes_dir, tmp_path):
    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), *RECIPE, "cluster.answer=cluster"])
    assert build_run(cfg).module.answer() == "cluster"
    weightless = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "task.cluster.weight=0",
                                        "cluster.answer=cluster"])
    with pytest.raises(ConfigValueError, match="cluster.answer='cluster' is not a clustering head"):
        build_run(weightless)  # a task that never trains cannot answer


def test_the_answer_is_the_latest_stage_then_its_own_lowest_loss_head():
    from mtl_unsup.models.backbones import SmallCNN
    from mtl_unsup.models.module import MultiTaskModule
    from mtl_unsup.tasks import ScanTask

    tasks = {"cluster": ClusterTask(start_epoch=0), "scan": ScanTask(start_epoch=0, num_heads=3),
             "over": ClusterTask(start_epoch=5, k_factor=2)}
    module = MultiTaskModule(SmallCNN(1, (4, 8)), tasks, 3, None, augmentations={"weak": torch.nn.Identity()})
    module.adopt_task_states({"cluster": ClusterState(torch.zeros(4, dtype=torch.long), torch.zeros(3, 8),
                                                     torch.zeros(8), torch.eye(8))}, reset_head=False)
    assert module.answer() == "cluster"  # SCAN has not trained yet; the 6-cluster head never answers
    tasks["scan"].trained_steps += 1
    tasks["scan"].head_losses.copy_(torch.tensor([0.3, -0.2, 0.1]))
    assert module.answer() == "scan_h1"
    tasks["scan"].usable = False  # fell apart at the end of training
    assert module.answer() == "cluster"


def test_a_scan_head_that_never_trained_is_no_answer(shapes_dir, tmp_path, caplog):
    overrides = [*tiny_folder_overrides(shapes_dir), "task=[cluster,rotation,scan]",
                 "task.scan.start_epoch=20", "task.scan.num_neighbors=3"]
    metrics = train(compose_cfg(tmp_path, overrides))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["answer"] == "cluster"
    assert metrics["test/acc"] == metrics["test/cluster/acc"]
    assert "The scan head never trained (its task starts at epoch 20): it is not the run's answer" \
        in caplog.text


def test_self_labelling_leaves_the_shared_features_trainable_and_survives_an_empty_batch():
    from mtl_unsup.models.backbones import SmallCNN
    from mtl_unsup.tasks import SelfLabelTask, TaskBatch

    backbone, source = SmallCNN(1, (4, 8)), ClusterTask()
    source.build(backbone.feature_dim, 3)
    task = SelfLabelTask(source="cluster", threshold=1.0, min_share=0.0)
    task.build(backbone.feature_dim, 3)
    task.bind({"cluster": source})
    x = torch.rand(4, 1, 8, 8)
    batch = TaskBatch({"weak": [x], "strong": [x]}, torch.arange(4), backbone)
    loss = task.loss(batch)  # nobody reaches probability 1: no targets, a zero loss, no NaN
    assert torch.isfinite(loss) and float(loss) == 0.0
    assert batch.features("weak").requires_grad  # a later task still trains the backbone through it


def test_exact_rounding_refuses_sizes_that_do_not_add_up():
    from mtl_unsup.clustering.sinkhorn import round_with_capacities

    with pytest.raises(ValueError, match="sum to the 4 rows"):
        round_with_capacities(torch.rand(4, 2), torch.tensor([2, 1]))
    labels = round_with_capacities(torch.rand(5, 2), torch.tensor([3, 2]))
    assert torch.bincount(labels).tolist() == [3, 2]


def test_with_automatic_k_every_active_task_is_refreshed_together(shapes_dir, tmp_path):
    from mtl_unsup.clustering.callback import PseudoLabelCallback

    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "task=[cluster,rotation,scan]",
                                 "task.scan.start_epoch=3", "task.scan.num_neighbors=3"])
    module = build_run(cfg).module
    made_at_2 = ClusterState(torch.zeros(4, dtype=torch.long), torch.zeros(3, 8), torch.zeros(8),
                             torch.eye(8), epoch=2)
    module.adopt_task_states({"cluster": made_at_2}, reset_head=False)
    fixed, auto = PseudoLabelCallback(3, every_n_epochs=5), PseudoLabelCallback("auto", every_n_epochs=5)
    assert fixed.due(module, 3) == ["scan"]  # only the task that starts
    assert auto.due(module, 3) == ["cluster", "scan"]  # a new k reaches every head at once


def test_settings_of_a_task_left_out_of_the_list_are_named(tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=mnist", "data.root=/nowhere", "task=[cluster,rotation]"])
    with pytest.raises(ConfigValueError, match=r"task.scan sets start_epoch but scan is not in the task "
                                               r"list \(cluster, rotation\).*~task.scan"):
        check_config(cfg)


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion_mnist", "cifar10"])
def test_each_experiment_composes_into_tasks_that_build(tmp_path, name):
    cfg = compose_cfg(tmp_path, [f"experiment={name}", "data.root=/nowhere"])
    check_config(cfg)
    tasks = build_tasks(cfg)
    if name != "digits":  # the staged SCAN recipe: pretext, then targets and neighbours, then self-labels
        assert tasks["selflabel"].start_epoch > tasks["scan"].start_epoch > tasks["contrastive"].start_epoch
        assert cfg.cluster.assign == "sinkhorn" and cfg.trainer.max_epochs > tasks["selflabel"].start_epoch


@pytest.mark.parametrize("criterion", ["silhouette", "calinski_harabasz", "davies_bouldin"])
def test_automatic_k_finds_the_number_of_blobs(criterion):
    x, _ = blobs([40, 60, 50, 45, 55])
    ctx = RefreshContext(x, epoch=0, seed=0, settings=ClusterSettings(pca_dim=None, k_range=(2, 9),
                                                                        k_criterion=criterion))
    scores = ctx.choose_k()
    assert ctx.k == 5 and sorted(scores) == list(range(2, 10))
    assert ctx.kmeans(5).k == 5  # the chosen clustering is the one training then uses


def test_automatic_k_is_chosen_recorded_and_kept_by_the_checkpoint(shapes_dir, tmp_path):
    overrides = [*tiny_folder_overrides(shapes_dir), "cluster.k=auto", "cluster.k_range=[2,5]",
                 "task=[cluster,rotation,scan,overcluster]", "task.scan.start_epoch=0",
                 "task.scan.num_neighbors=3", "task.scan.num_heads=1", "task.overcluster.start_epoch=0",
                 "pictures=true"]
    metrics = train(compose_cfg(tmp_path, overrides))
    k = int(metrics["cluster/k"])
    rows = (tmp_path / "k_selection.csv").read_text().splitlines()
    assert rows[0] == "k,silhouette,chosen" and [r.split(",")[0] for r in rows[1:]] == ["2", "3", "4", "5"]
    assert [r.split(",")[0] for r in rows[1:] if r.endswith(",1")] == [str(k)]
    assert (tmp_path / "pictures" / "k_selection.png").is_file()
    module, _ = model_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.k == k and module.answer() == ckpt["answer"]  # heads of 5 rows answer with k columns
    logits = module.head_logits(torch.randn(4, module.backbone.feature_dim))
    assert logits["scan"].shape == (4, k) and logits["cluster"].shape == (4, k)
    assert logits["overcluster"].shape == (4, 5 * k)  # k_factor=5 times the chosen k
    assert sorted(module.k_selection) == [2, 3, 4, 5]


@pytest.mark.parametrize(("override", "says"), [
    ("cluster.k=ten", "cluster.k='ten': use a number of clusters"),
    ("cluster.k_range=[5,3]", "cluster.k_range=[5, 3]: give [smallest, largest]"),
    ("cluster.k_criterion=gap", "cluster.k_criterion='gap': use one of silhouette"),
])
def test_automatic_k_mistakes_are_named(tmp_path, override, says):
    cfg = compose_cfg(tmp_path, ["cluster.k=auto", override])
    with pytest.raises(ConfigValueError, match=re.escape(says)):
        check_config(cfg)


@pytest.mark.parametrize("data", ["digits", "mnist", "cifar10"])
def test_every_benchmark_recipe_composes_on_every_experiment(tmp_path, data):
    from mtl_unsup.benchmarks.recipes import RECIPES, base_overrides, recipe_overrides

    base = base_overrides(data, "/nowhere")
    for name in RECIPES:
        if name == "staged" and data == "digits":  # no scan_digits: the benchmark refuses it
            continue
        cfg = compose_cfg(tmp_path, recipe_overrides(name, base))
        check_config(cfg)  # no stray settings of a task the recipe leaves out
        assert ("scan" in cfg.task) == (name in ("scan", "staged"))
        # the staged recipe trains the data's staged protocol, the others one stage
        assert bool(cfg.get("stages")) == (name == "staged")


def test_the_staged_recipe_is_refused_where_the_data_has_no_staged_protocol(tmp_path):
    from mtl_unsup.benchmarks.recipes import main

    with pytest.raises(SystemExit, match=r"digits has no staged protocol"):
        main(["--data", "digits", "--recipes", "scan", "staged", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # refused before anything ran or was written


def test_the_staged_recipe_runs_only_when_named_and_is_checked_before_any_run(tmp_path):
    from mtl_unsup.benchmarks.recipes import RECIPES, main, parse_args

    assert parse_args(["--data", "digits"]).recipes == [r for r in RECIPES if r != "staged"]
    # an extra override every stage replaces would fail the staged run only after the others
    with pytest.raises(SystemExit, match=r"--recipes staged: trainer.max_epochs=45: every stage"):
        main(["--data", "mnist", "--root", "/nowhere", "--recipes", "scan", "staged", "--out", str(tmp_path),
              "trainer.max_epochs=45"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("names", "source"), [
    (("cluster", "rotation"), "cluster"),  # no scan task: the run's answer head self-labels
    (("cluster", "scan"), "scan"),
    (("scan", "cluster"), "scan"),
])
def test_self_labelling_trains_the_head_that_answers(names, source):
    from mtl_unsup.tasks import ScanTask, SelfLabelTask

    made = {"cluster": ClusterTask, "rotation": RotationTask, "scan": ScanTask}
    tasks = {n: made[n]() for n in names}
    tasks["overcluster"] = ClusterTask(k_factor=5)  # never the answer: its k is not the run's
    tasks["selflabel"] = SelfLabelTask()
    for task in tasks.values():
        task.build(16, 3)
    tasks["selflabel"].bind(tasks)
    assert tasks["selflabel"].source == source


def test_self_labelling_without_a_clustering_head_says_what_to_add():
    from mtl_unsup.tasks import SelfLabelTask

    tasks = {"rotation": RotationTask(), "selflabel": SelfLabelTask()}
    for task in tasks.values():
        task.build(16, 3)
    with pytest.raises(ValueError, match=r"no task of this run has one: add one"):
        tasks["selflabel"].bind(tasks)


def test_a_staged_runs_answer_is_read_from_its_last_stages_checkpoint(tmp_path):
    import json

    from mtl_unsup.benchmarks.recipes import final_checkpoint

    (tmp_path / "stages.json").write_text(json.dumps({"done": {"pretext": {}, "scan": {}}, "seconds": 1.0}))
    assert final_checkpoint(tmp_path) == tmp_path / "checkpoints" / "scan" / "last.ckpt"
    one_stage = tmp_path / "checkpoints" / "last.ckpt"
    one_stage.parent.mkdir()
    one_stage.write_bytes(b"")
    assert final_checkpoint(tmp_path) == one_stage
