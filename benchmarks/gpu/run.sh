#!/usr/bin/env bash
# The GPU check, in one call on a lent accelerator (see check.py for the steps):
#
#   bash benchmarks/gpu/run.sh                  # there: installs the carried wheels, then runs
#   bash benchmarks/gpu/run.sh --cpu-rehearsal  # here: the same steps at tiny sizes on the CPU
#
# Nothing is fetched from the network: the wheels the device lacks come from
# benchmarks/gpu/wheels/ (bash benchmarks/gpu/prepare.sh fills it); the project itself runs from
# this checkout (PYTHONPATH), so nothing has to be built there. Results go under $OUT (the device
# tool's folder that comes back) or benchmarks/results/gpu-<mode>/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
mode=gpu
for argument in "$@"; do
  case "$argument" in
    --cpu-rehearsal) mode=cpu ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $argument (see --help)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
out="${OUT:-$root/benchmarks/results/gpu-$mode}/gpu-check"
mkdir -p "$out"

if [ "$mode" = gpu ]; then
  shopt -s nullglob
  wheels=("$here"/wheels/*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "installing ${#wheels[@]} carried wheel(s), no network"
    "$python" -m pip install --no-index --no-deps --quiet --disable-pip-version-check \
      "${wheels[@]}"
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader || echo "nvidia-smi: not found"
fi
"$python" - <<'PY'
import importlib
missing = [m for m in ("torch", "timm", "faiss", "albumentations", "pydantic", "typer", "rich",
                       "cv2", "fastapi", "uvicorn", "multipart", "yaml") if
           importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit(f"missing here: {', '.join(missing)} (run benchmarks/gpu/prepare.sh and carry "
                     "benchmarks/gpu/wheels)")
PY
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$python" "$here/check.py" --mode "$mode" --out "$out"
