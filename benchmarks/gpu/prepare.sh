#!/usr/bin/env bash
# Runs here, on the CPU machine: downloads into benchmarks/gpu/wheels/ (git-ignored) the wheels
# the lent GPU machine lacks, for its Python (3.12) and platform, and prints the carry list to
# pass to the device tool. What the device has is listed in the tool library's
# device/KINDS.md ("Python packages already there"); the rest of what Ascension imports is here,
# at the versions this project is tested with (those of the local environment when known).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
wheels="$here/wheels"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
limit_mib=60   # the device tool carries 64 MiB in all; leave room for the checkout itself

# Packages the device image does not hold (KINDS.md, 2026-11-17): the core dependencies first,
# then those of the serve extra and the shards extra.
packages=(faiss-cpu albumentations albucore simsimd stringzilla pydantic pydantic-core
          annotated-types typing-inspection fastapi starlette uvicorn python-multipart
          webdataset braceexpand)
pinned=()
for name in "${packages[@]}"; do
  version="$("$python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)"
  pinned+=("$name${version:+==$version}")
done
rm -rf "$wheels" && mkdir -p "$wheels"
echo "downloading for CPython 3.12, manylinux x86_64: ${pinned[*]}"
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d "$wheels" "${pinned[@]}" 2> >(grep -v "is ignored: it is neither a file" >&2)
size_mib=$(( ($(du -sb "$wheels" | cut -f1) + 1048575) / 1048576 ))
echo "$(ls "$wheels" | wc -l) wheels, ${size_mib} MiB in $wheels"
if [ "$size_mib" -gt "$limit_mib" ]; then
  echo "prepare.sh: the wheels take ${size_mib} MiB, over the ${limit_mib} MiB the device can carry" >&2
  exit 1
fi
echo 'carry: ["benchmarks/gpu/wheels"]'
echo 'then, in one device call: bash benchmarks/gpu/run.sh (timeout_s 540 leaves room for a rerun)'
