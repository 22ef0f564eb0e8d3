#!/usr/bin/env bash
# Make sure Debian's Fashion-MNIST mirror is installed; install it when we can.
# Usage: scripts/ensure_mirror.sh [MIRROR_DIR]
# Without the mirror the ingest stage falls back to tfds's download, which needs the network,
# so a missing mirror is a warning here, not an error.
set -euo pipefail

mirror_dir=${1:-/usr/share/datasets/fashion-mnist}
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() {
  for f in "${files[@]}"; do [[ -f "$mirror_dir/$f" ]] || return 1; done
}

have_all && exit 0

if [[ "$mirror_dir" == /usr/share/datasets/fashion-mnist ]] \
   && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "Fashion-MNIST mirror missing: installing Debian's dataset-fashion-mnist (apt-get)..."
  export DEBIAN_FRONTEND=noninteractive
  if (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
           && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) && have_all; then
    echo "Installed the mirror in $mirror_dir."
    exit 0
  fi
  echo "apt-get could not install dataset-fashion-mnist." >&2
fi

cat >&2 <<MSG
WARNING: no Fashion-MNIST mirror in $mirror_dir.
  Install it with:   sudo apt-get install dataset-fashion-mnist
  (or set data.mirror_dir in params.yaml to a folder holding ${files[*]}).
  Without it, the ingest stage downloads the data through tensorflow-datasets (network needed).
MSG
