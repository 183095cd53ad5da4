#!/usr/bin/env bash
# Copies this checkout to every worker (run before setup.sh and after code changes).
source "$(dirname "$0")/env.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
run gcloud compute tpus tpu-vm scp --recurse "${root}" "${TPU_NAME}:~/${REPO_DIR}" \
  --project="${PROJECT}" --zone="${ZONE}" --worker=all
