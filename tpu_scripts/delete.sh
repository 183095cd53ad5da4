#!/usr/bin/env bash
# Deletes the TPU VM slice.
source "$(dirname "$0")/env.sh"
run gcloud compute tpus tpu-vm delete "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" --quiet
