#!/usr/bin/env bash
# Starts the same training command on all workers (multi-host: jax.distributed.initialize()),
# detached, with one log file per worker and the workdir on GCS.
#   ./tpu_scripts/run.sh configs/dualtoken_so400m.py:res=384,stage=1 --config.data.path=gs://…
source "$(dirname "$0")/env.sh"
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [--config.key=value ...]" >&2
  exit 2
fi
config="$1"; shift
name="$(basename "${config%%:*}" .py)"
: "${RUN_NAME:=${name}_$(date +%Y%m%d_%H%M%S)}"
workdir="${BUCKET}/runs/${RUN_NAME}"
args="$(printf '%q ' "$@")"
on_all_workers "cd ${REPO_DIR} && . ${VENV}/bin/activate && \
nohup python -m dualtoken_jax.train --config=${config} --workdir=${workdir} \
--config.distributed=True ${args} > \$HOME/${RUN_NAME}.worker\$(hostname | sed 's/.*-w-//').log 2>&1 &"
echo "workdir: ${workdir}  (logs: ~/${RUN_NAME}.worker*.log on each worker; tail.sh to follow)"
