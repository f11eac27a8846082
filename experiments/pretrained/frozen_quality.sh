#!/bin/bash
# Issue 9 quality: the small CNN pretrained by mtl-unsup on CIFAR-10 train/ (the `balanced` run of the
# CIFAR comparison, 40 min), frozen, clusters CIFAR-10 test/ (10,000 images it never saw; split 70/10/20
# by data.val_fraction/test_fraction); against the small CNN trained from scratch on the same images
# for the same wall time, and for its full 60-epoch schedule.
# Usage: frozen_quality.sh <pretrained checkpoint> <cifar10>/test <output folder>   (from the repository root)
set -e
CKPT=$1; ROOT=$2; OUT=$3
PY=${PY:-python}
mkdir -p $OUT
echo "pretrained: $CKPT"; date
S=$(date +%s.%N)
$PY -m mtl_unsup.train data=folder protocol=single data.root=$ROOT print_config=false pictures=false \
  trainer.enable_progress_bar=false paths.cache_dir=$OUT/cache backbone.weights_path=$CKPT \
  backbone.freeze=true task=[cluster,scan] task.cluster.start_epoch=0 task.scan.start_epoch=0 \
  data.embedding_copies=2 cluster.every_n_epochs=1 trainer.max_epochs=50 hydra.run.dir=$OUT/frozen > $OUT/frozen.log 2>&1
E=$(date +%s.%N); T=$(python3 -c "print(int($E - $S))"); echo "frozen_seconds=$T"
MT=$(python3 -c "t=$T; print(f'00:00:{t//60:02d}:{t%60:02d}')")
$PY -m mtl_unsup.train experiment=cifar10 data.root=$ROOT print_config=false pictures=false \
  trainer.enable_progress_bar=false task.cluster.start_epoch=3 task.scan.start_epoch=3 task.selflabel.start_epoch=6 \
  trainer.max_epochs=8 trainer.max_time=$MT hydra.run.dir=$OUT/scratch_equal > $OUT/scratch_equal.log 2>&1
echo "scratch_equal done"; date
S=$(date +%s.%N)
$PY -m mtl_unsup.train experiment=cifar10 data.root=$ROOT print_config=false pictures=false \
  trainer.enable_progress_bar=false hydra.run.dir=$OUT/scratch_full > $OUT/scratch_full.log 2>&1
E=$(date +%s.%N); echo "scratch_full_seconds=$(python3 -c "print(int($E - $S))")"; date
for r in frozen scratch_equal scratch_full; do echo "$r $(python3 -c "import json; m=json.load(open('$OUT/$r/metrics.json')); print({k: round(v,4) for k,v in m.items() if k.startswith('test/') and k.split('/')[1] in ('acc','nmi','ari','kmeans_acc')})")"; done
