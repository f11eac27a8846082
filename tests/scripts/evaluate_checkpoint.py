"""Test a checkpoint (DDP when devices > 1) and write the test metrics as JSON from rank 0.

Usage: python evaluate_checkpoint.py <out json> <devices> <image folder> <checkpoint>. Lightning's DDP
launcher re-runs this script for the other ranks, which is why it is a script.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mtl_unsup.train import build_run, flatten_results  # noqa: E402
from tests.conftest import compose_cfg, tiny_folder_overrides  # noqa: E402


def main() -> None:
    out, devices, root, ckpt = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    overrides = [*tiny_folder_overrides(Path(root)), "trainer.accelerator=cpu",
                 f"trainer.devices={devices}", "data.eval_batch_size=4", "~logger"]
    if devices > 1:
        overrides += ["trainer.strategy=ddp"]
    run = build_run(compose_cfg(out.parent / f"run{devices}", overrides))
    results = run.trainer.test(run.module, datamodule=run.datamodule, ckpt_path=ckpt,
                               weights_only=True, verbose=False)
    if run.trainer.is_global_zero:
        out.write_text(json.dumps(flatten_results(results), indent=2))


if __name__ == "__main__":
    main()
