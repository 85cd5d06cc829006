#!/usr/bin/env bash
# The lifecycle of playbooks/train.yml written with nothing but curl, ssh, scp and tar: the yardstick
# for the playbooks' orchestration overhead (tests/test_roles_e2e.py). Same API calls, same copies,
# same launcher, same polling interval; no change detection, no validation, no cleanup on failure.
#
# Environment: API_URL API_KEY INSTANCE_NAME INSTANCE_TYPE KEY_NAME PUBLIC_KEY_FILE
#   SSH_KEY SSH_PORT SSH_USER REMOTE_DIR JOB_SRC DATASET JOB_JSON ENV_FILE PYTHON RUN_ID
#   LAUNCHER FETCH_DIR POLL_SECONDS
set -euo pipefail

api() { curl -sf -H "Authorization: Bearer $API_KEY" -H 'Content-Type: application/json' "$@"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Up: register the key unless known, launch, wait until active with an ip, wait for SSH.
if ! api "$API_URL/ssh-keys" | jq -e --arg n "$KEY_NAME" '.data[] | select(.name == $n)' >/dev/null; then
  jq -n --arg n "$KEY_NAME" --arg k "$(cat "$PUBLIC_KEY_FILE")" '{name: $n, public_key: $k}' |
    api -X POST "$API_URL/ssh-keys" -d @- >/dev/null
fi
id=$(jq -n --arg n "$INSTANCE_NAME" --arg t "$INSTANCE_TYPE" --arg k "$KEY_NAME" \
  '{region_name: "us-east-1", instance_type_name: $t, ssh_key_names: [$k], name: $n}' |
  api -X POST "$API_URL/instance-operations/launch" -d @- | jq -r '.data.instance_ids[0]')
until ip=$(api "$API_URL/instances/$id" | jq -er 'select(.data.status == "active") | .data.ip'); do sleep 0.5; done
ssh_opts=(-i "$SSH_KEY" -o IdentitiesOnly=yes -o BatchMode=yes -o LogLevel=ERROR
  -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile="$work/known_hosts")
host="$SSH_USER@$ip"
on() { ssh -p "$SSH_PORT" "${ssh_opts[@]}" "$host" "$@"; }
copy() { scp -q -P "$SSH_PORT" "${ssh_opts[@]}" "$@"; }
on true

# Push: the job code as a tarball, the dataset folder as a tarball.
run_dir="runs/$RUN_ID"
on "mkdir -p -m 700 $REMOTE_DIR/job $REMOTE_DIR/data $REMOTE_DIR/$run_dir"
tar -czf "$work/job.tar.gz" -C "$(dirname "$JOB_SRC")" "$(basename "$JOB_SRC")"
tar -czf "$work/data.tar.gz" -C "$(dirname "$DATASET")" "$(basename "$DATASET")"
copy "$work/job.tar.gz" "$host:$REMOTE_DIR/job/"
on "tar -xzf $REMOTE_DIR/job/job.tar.gz -C $REMOTE_DIR/job"
copy "$work/data.tar.gz" "$host:$REMOTE_DIR/data/"
on "tar -xzf $REMOTE_DIR/data/data.tar.gz -C $REMOTE_DIR/data"

# Configure: job config and env file.
copy "$JOB_JSON" "$host:$REMOTE_DIR/job.json"
copy "$ENV_FILE" "$host:$REMOTE_DIR/secrets.env"
on "chmod 600 $REMOTE_DIR/job.json $REMOTE_DIR/secrets.env"

# Install: the venv is there when its stamp is (the deps role made it).
on "test -x $REMOTE_DIR/venv/bin/python && test -f $REMOTE_DIR/venv/.llama-trainer-requirements.sha256"

# Train: start detached, poll the log until the exit code appears, fetch result and log.
copy "$LAUNCHER" "$host:$REMOTE_DIR/$run_dir/launch.sh"
on "cd $REMOTE_DIR && setsid nohup bash $run_dir/launch.sh $run_dir $PYTHON >/dev/null 2>&1 </dev/null &"
until on "tail -n 20 $REMOTE_DIR/$run_dir/train.log 2>/dev/null; test -f $REMOTE_DIR/$run_dir/exit_code" >/dev/null; do
  sleep "$POLL_SECONDS"
done
mkdir -p "$FETCH_DIR"
copy "$host:$REMOTE_DIR/$run_dir/outputs/result.json" "$host:$REMOTE_DIR/$run_dir/train.log" "$FETCH_DIR/"
test "$(on "cat $REMOTE_DIR/$run_dir/exit_code")" = 0

# Outputs (the model is not on the Hub): tar them on the instance, fetch, check the SHA-1, unpack here,
# then mark them fetched on the instance and remove its archive.
sha1=$(on "tar -cf $REMOTE_DIR/$run_dir/outputs.tar -C $REMOTE_DIR/$run_dir/outputs . && sha1sum $REMOTE_DIR/$run_dir/outputs.tar" | cut -d' ' -f1)
copy "$host:$REMOTE_DIR/$run_dir/outputs.tar" "$FETCH_DIR/"
test "$(sha1sum "$FETCH_DIR/outputs.tar" | cut -d' ' -f1)" = "$sha1"
tar -xf "$FETCH_DIR/outputs.tar" -C "$FETCH_DIR" && rm "$FETCH_DIR/outputs.tar"
on "echo '{\"fetched_to\": \"$FETCH_DIR\"}' > $REMOTE_DIR/$run_dir/outputs-fetched && rm -f $REMOTE_DIR/$run_dir/outputs.tar"

# Down: remove the secrets, terminate, wait until terminated.
on "rm -f $REMOTE_DIR/secrets.env"
jq -n --arg i "$id" '{instance_ids: [$i]}' | api -X POST "$API_URL/instance-operations/terminate" -d @- >/dev/null
until api "$API_URL/instances/$id" | jq -e '.data.status == "terminated"' >/dev/null; do sleep 0.5; done
