#!/usr/bin/env bash
# Creates the TPU VM slice (spot by default; SPOT=0 for on-demand).
source "$(dirname "$0")/env.sh"
extra=()
[[ "${SPOT:-1}" == "1" ]] && extra+=(--spot)
run gcloud compute tpus tpu-vm create "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
  --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" "${extra[@]}"
