#!/usr/bin/env bash
# Shared settings for the TPU scripts. Override any of them in the environment, e.g.
#   TPU_NAME=dt-v5p64 ACCELERATOR_TYPE=v5p-64 ZONE=us-east5-a ./tpu_scripts/create.sh
# DRY_RUN=1 prints every gcloud command instead of running it.
set -euo pipefail

: "${PROJECT:=$(gcloud config get-value project 2>/dev/null || echo my-project)}"
: "${ZONE:=us-west4-a}"
: "${TPU_NAME:=dualtoken-v5e32}"
: "${ACCELERATOR_TYPE:=v5litepod-32}"          # v5e-32; v5p-64 is "v5p-64"
: "${RUNTIME_VERSION:=v2-alpha-tpuv5-lite}"     # v5p: v2-alpha-tpuv5
: "${BUCKET:=gs://my-bucket/dualtoken}"        # workdirs and logs live here
: "${REPO_DIR:=dualtoken-jax}"                 # checkout location on every worker
: "${VENV:=\$HOME/dualtoken_venv}"
: "${JAX_VERSION:=0.10.2}"
: "${DRY_RUN:=0}"

# Runs a command, or prints it when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

# gcloud ssh to all workers with the same command.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
    --worker=all --command="$1"
}
