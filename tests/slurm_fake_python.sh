#!/usr/bin/env bash
# Stand-in for python in the SLURM chain tests: records its arguments (and array/job ids) in $FAKE_PY_LOG.
echo "job=${SLURM_JOB_ID:-} array=${SLURM_ARRAY_TASK_ID:-} step=${PREP_STEP:-} rank=${RANK:-} args=$*" >> "${FAKE_PY_LOG:?}"
