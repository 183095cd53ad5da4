#!/usr/bin/env bash
# Stops training on every worker (SIGTERM first: it saves a checkpoint) and frees the TPUs.
source "$(dirname "$0")/env.sh"
on_all_workers "pkill -TERM -f dualtoken_jax.train; sleep ${GRACE_SECONDS:-60}; \
pkill -KILL -f dualtoken_jax.train; sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9; true"
