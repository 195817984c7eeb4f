#!/usr/bin/env bash
# Node side of a replaceme GPU bundle (slice @SLICE@). Written by `make bundle`; run it where every part has arrived:
#     bash run.sh [RESULTS_DIR]          (default: ./results; env PYTHON, DEVICE, DTYPE, BUNDLE_WORK override)
# 1 checks the device with the node's own python and torch (seconds; exit 3 and one line if it cannot be used),
# 2 checks that every part is here and intact (sha256), joins them and unpacks (project, wheels, packaged assets),
# 3 installs the wheels with no index into a private folder that shadows the node's copies (never its torch),
# 4 checks the versions the numbers depend on, 5 runs the slice's notebooks, 6 packs what figures/ gained into at most
# 8 files of at most 16 MiB in RESULTS_DIR (results-*.tar.gz[.NN], run-@SLICE@.json, run-@SLICE@.log).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
WORK="${BUNDLE_WORK:-$HERE/work}"
RESULTS="$(mkdir -p "${1:-${RESULTS:-$HERE/results}}" && cd "${1:-${RESULTS:-$HERE/results}}" && pwd)"
SLICE="@SLICE@"
PROFILE_ARG="@PROFILE@"
NOTEBOOKS=(@NOTEBOOKS@)
DEVICE="${DEVICE:-@DEVICE@}"
DTYPE="${DTYPE:-@DTYPE@}"
PAYLOAD_SHA256="@PAYLOAD_SHA256@"
T0=$(date +%s)
say() { echo "[run.sh $(( $(date +%s) - T0 ))s] $*"; }
die() { echo "run.sh: $1" >&2; exit "${2:-1}"; }

# 1. the device, before anything else (a node without a working GPU stops here, in seconds)
"$PY" "$HERE/device_check.py" "$DEVICE" "$DTYPE" || exit 3

# 2. parts: all here, each intact, joined and unpacked once
missing=()
while read -r _sum name; do [ -f "$HERE/$name" ] || missing+=("$name"); done < "$HERE/SHA256SUMS"
[ ${#missing[@]} -eq 0 ] || die "missing part(s): ${missing[*]}: copy every transfer's files into $HERE"
if [ ! -f "$WORK/.unpacked" ] || [ "$(cat "$WORK/.unpacked")" != "$PAYLOAD_SHA256" ]; then
  (cd "$HERE" && sha256sum --quiet -c SHA256SUMS) || die "a part is corrupt (sha256 mismatch above): copy it again"
  rm -rf "$WORK"; mkdir -p "$WORK"
  while read -r _sum name; do cat "$HERE/$name"; done < "$HERE/SHA256SUMS" > "$WORK/payload.tar.gz"
  got="$(sha256sum "$WORK/payload.tar.gz" | cut -d' ' -f1)"
  [ "$got" = "$PAYLOAD_SHA256" ] || die "joined payload has sha256 $got, expected $PAYLOAD_SHA256"
  tar -xzf "$WORK/payload.tar.gz" -C "$WORK" && rm -f "$WORK/payload.tar.gz"
  say "parts verified, joined and unpacked"

  # 3. wheels into a private folder, no index (the node's torch and site-packages stay as they are)
  PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir \
    --disable-pip-version-check --target "$WORK/site" "$WORK"/wheels/*.whl || die "pip could not install the carried wheels"
  echo "$PAYLOAD_SHA256" > "$WORK/.unpacked"
  say "wheels installed into $WORK/site"
fi

export PYTHONPATH="$WORK/site:$WORK/project${PYTHONPATH:+:$PYTHONPATH}"
export REPLACEME_CACHE="$WORK/cache" HF_HOME="$WORK/hf" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 JUPYTER_PATH="$WORK/jupyter" JUPYTER_CONFIG_DIR="$WORK/jupyter-config" JUPYTER_DATA_DIR="$WORK/jupyter"
export JUPYTER_PLATFORM_DIRS=1
mkdir -p "$WORK/jupyter/kernels/python3"
printf '{"argv": ["%s", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "Python 3", "language": "python"}\n' \
  "$(command -v "$PY" || echo "$PY")" > "$WORK/jupyter/kernels/python3/kernel.json"

# 4. the versions the numbers depend on (one line each, before any notebook)
"$PY" -m replaceme_core.bundle.verify_env "$WORK/requirements.txt" "$WORK/site" || die "the environment does not match the bundle (above)"

# 5. the slice
mkdir -p "$WORK/figures"
find "$WORK/figures" -type f -exec sha256sum {} + 2>/dev/null | sort > "$WORK/figures.before" || true
say "running ${NOTEBOOKS[*]} (profile $PROFILE_ARG, device $DEVICE)"
T_RUN=$(date +%s)
set +e
(cd "$WORK/project" && "$PY" -m replaceme_core.experiments.paper --profile "$PROFILE_ARG" --figures "$WORK/figures" \
   --build "$WORK/build" --timings-json "$WORK/timings.json" --only "${NOTEBOOKS[@]}") 2>&1 | tee "$WORK/run.log"
rc=${PIPESTATUS[0]}
set -e
say "notebooks finished with exit code $rc in $(( $(date +%s) - T_RUN ))s"

# 6. what figures/ gained, at most 8 files back
"$PY" -m replaceme_core.bundle.pack --work "$WORK" --results "$RESULTS" --manifest "$HERE/manifest.json" \
  --rc "$rc" --seconds "$(( $(date +%s) - T0 ))" --device "$DEVICE"
exit "$rc"
