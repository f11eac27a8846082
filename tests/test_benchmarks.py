"""The speed benchmarks run end to end on a tiny folder and print every figure they promise (their
values are measured on real data and reported in experiments/, never asserted here)."""

from mtl_unsup.benchmarks import epoch

from .conftest import TINY


def test_the_epoch_benchmark_prints_each_figure_with_a_sane_value(shapes_dir, capsys):
    tiny = [o for o in TINY if not o.startswith(("trainer.max_epochs", "trainer.check_val", "cluster.every",
                                                 "task.cluster.start_epoch", "print_config", "pictures"))]
    figures = epoch.main([*tiny, f"data.root={shapes_dir}", "data.channels=1", "data.image_size=16",
                          "data.mean=[0.3]", "data.std=[0.4]"])  # data.root alone implies data=folder
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines() if "=" in line)
    names = {"setup_seconds", "decode_seconds", "framework_epoch_seconds", "bare_epoch_seconds",
             "framework_vs_bare",
             "loader_wait_share", "refresh_seconds", "refresh_share", "kmeans_seconds",
             "kmeans_vs_flop_limit"}
    assert names <= set(figures) and names <= set(printed)
    assert 0 <= figures["loader_wait_share"] < 1 and figures["framework_vs_bare"] > 0
    assert figures["decode_seconds"] > 0  # the shapes fit the in-memory cache: decoded once
    assert figures["steps_per_epoch"] == figures["train_images"] // 16  # drop_last batches of 16
    assert figures["refresh_seconds"] > 0 and figures["kmeans_vs_flop_limit"] > 1  # no faster than the floor
