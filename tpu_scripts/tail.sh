#!/usr/bin/env bash
# Follows worker 0's newest training log (WORKER=k for another one).
source "$(dirname "$0")/env.sh"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
  --worker="${WORKER:-0}" --command='tail -n 100 -f $(ls -t $HOME/*.worker*.log | head -n 1)'
