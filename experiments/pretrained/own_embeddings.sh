#!/bin/bash
# Bring your own embeddings, end to end (issue 9): mtl-predict writes the features of CIFAR-10's
# train/ images with a trained model (embeddings.npy + embedding_paths.txt), then data=embeddings
# clusters them as a user's file (labels from the paths' class subfolders, for scores only); and a
# synthetic 50,000 x 512 file gives the time at that size.
#   experiments/pretrained/own_embeddings.sh <checkpoint> <cifar10 folder with train/> <out dir>
set -e
CKPT=$1; CIFAR=$2; OUT=$3
PY=${PY:-python}
mkdir -p "$OUT"
seconds() { python3 -c "print(round($2 - $1, 1))"; }
S=$(date +%s.%N)
$PY -m mtl_unsup.predict ckpt="$CKPT" data.root="$CIFAR/train" save_embeddings=true progress=false \
  hydra.run.dir="$OUT/predict_train" > "$OUT/predict_train.log" 2>&1
echo "predict_seconds=$(seconds "$S" "$(date +%s.%N)")"
$PY - "$OUT" <<'PY'
import sys
import numpy as np
rng = np.random.default_rng(0)
n, d, k = 50000, 512, 10
centres = rng.normal(size=(k, d)) * 0.35
y = rng.integers(0, k, n)
np.savez(f"{sys.argv[1]}/synthetic_50k_512.npz", embeddings=(centres[y] + rng.normal(size=(n, d))).astype(np.float32), labels=y)
PY
for d in cifar synthetic; do
  if [ $d = cifar ]; then
    A="data.path=$OUT/predict_train/embeddings.npy data.paths_file=$OUT/predict_train/embedding_paths.txt"
  else
    A="data.path=$OUT/synthetic_50k_512.npz"
  fi
  S=$(date +%s.%N)
  $PY -m mtl_unsup.train data=embeddings $A print_config=false trainer.enable_progress_bar=false \
    hydra.run.dir="$OUT/$d" > "$OUT/$d.log" 2>&1
  echo "$d seconds=$(seconds "$S" "$(date +%s.%N)") $(grep '^| test' "$OUT/$d.log")"
done
