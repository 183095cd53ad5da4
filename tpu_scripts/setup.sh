#!/usr/bin/env bash
# Idempotent: venv + jax[tpu] + the project's requirements on every worker.
source "$(dirname "$0")/env.sh"
on_all_workers "set -e; python3 -m venv ${VENV} && . ${VENV}/bin/activate && \
pip install -q -U pip && pip install -q 'jax[tpu]==${JAX_VERSION}' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html && \
pip install -q -r ${REPO_DIR}/requirements.txt -e ${REPO_DIR}"
