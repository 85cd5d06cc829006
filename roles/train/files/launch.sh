#!/usr/bin/env bash
# Runs one training run. The train role starts it as an async task, so it outlives the SSH session.
#
#   launch.sh RUN_DIR PYTHON [train.py arguments]      (working directory: the trainer directory)
#
# Records its pid in RUN_DIR/train.pid, exports the job's env file (secrets stay out of argv and of
# Ansible's async files), sends the job's stdout (JSON events) and stderr to RUN_DIR/train.log, and
# writes the exit status to RUN_DIR/exit_code when the job ends. A pid without an exit_code is a run
# that died (killed, out of memory, reboot).
set -u
run_dir=$1
python=$2
shift 2
umask 077
echo "$$" > "$run_dir/train.pid"
if [ -f secrets.env ]; then
  set -a
  # shellcheck disable=SC1091
  . ./secrets.env
  set +a
fi
# Events must reach the log as they happen, not when a buffer fills.
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/job${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m trainjob.train --config job.json "$@" >>"$run_dir/train.log" 2>&1 </dev/null
status=$?
echo "$status" > "$run_dir/exit_code.tmp"
mv -f "$run_dir/exit_code.tmp" "$run_dir/exit_code"
exit "$status"
