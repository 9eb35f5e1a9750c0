#!/usr/bin/env bash
# One device call: install the carried wheels, name the device and versions, run `bench gpu` under a budget; all
# output lands in $OUT (check.txt, results.jsonl, log.txt). If biomass still does not import, a plain torch + timm
# measurement of gold's step runs instead (scripts/torch_step.py), so the call is never wasted.
#   bash scripts/gpu_check.sh [BUDGET_S [bench gpu options, e.g. --cpu --model test_vit --size 64]]
# WHEELS: the wheel folder (default .whl, from `python -m biomass.bench wheelhouse .whl`); PYTHON (default python3).
OUT=${OUT:-$PWD/gpu_check}; WHEELS=${WHEELS:-.whl}; PY=${PYTHON:-python3}; SITE=${SITE:-/tmp/biomass_site}
BUDGET=${1:-330}; shift
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
else echo "no wheels in $WHEELS"; fi
nvidia-smi -L || echo "nvidia-smi: none"
"$PY" - <<'PYEOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for n in ("torch", "timm", "accelerate", "torchvision", "pydantic", "albumentations", "numpy"):
    try:
        print(n, md.version(n))
    except md.PackageNotFoundError:
        print(n, "missing")
PYEOF
if "$PY" -c "import biomass.bench.gpu_parts, biomass.config.load, biomass.data.images, biomass.submission"; then
  "$PY" -m biomass.bench gpu --budget "$BUDGET" --out "$OUT" "$@"
else
  echo "biomass does not import here: plain torch + timm step instead"
  "$PY" scripts/torch_step.py --out "$OUT" "$@"
fi
