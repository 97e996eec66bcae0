#!/usr/bin/env bash
# A real Slurm cluster end to end: starts munged, slurmctld and slurmd on this machine (one node on
# loopback, everything in a temporary directory, private ports and munge socket), then
#   1. submits a 3-shard sweep with `cimsweep slurm --submit` in which task 1 cannot write its
#      results file, and checks that the task fails and its merge job is cancelled, not left pending;
#   2. resubmits task 1 alone with --only-tasks and checks the new merge job completes;
#   3. checks the merged table equals the unsharded sweep's table byte for byte (md and csv) and
#      merged.jsonl holds every work unit exactly once.
# Usage: run_slurm_test.sh CIMSWEEP_BINARY SOURCE_DIR (ctest passes both). Exit 77: skipped, only
# when Slurm or munge is not installed (tools/install-deps.sh --with-slurm) or not run as root.
set -euo pipefail

binary=$(readlink -f "$1")
source_dir=$(readlink -f "$2")
start_seconds=$SECONDS
job_timeout_s=${CIMSWEEP_SLURM_TEST_TIMEOUT:-120}

skip() {
  echo "SKIP: $*"
  exit 77
}
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

export PATH="$PATH:/usr/sbin:/sbin"
for tool in munged slurmctld slurmd sbatch squeue sinfo scontrol scancel; do
  command -v "$tool" >/dev/null ||
    skip "$tool is not installed: tools/install-deps.sh --with-slurm installs slurm-wlm and munge"
done
[ "$(id -u)" -eq 0 ] || skip "slurmd must run as root to start jobs as their user; run as root (CI does)"
data=/usr/share/datasets/fashion-mnist
[ -d "$data" ] || fail "$data is missing: run tools/install-deps.sh"

# Inside a Slurm job (a CI runner on a cluster) the job's variables would reach our clients.
while read -r name; do unset "$name"; done < <(compgen -e | grep -E '^(SLURM|SBATCH|SQUEUE|SINFO|SACCT)_' || true)

work=$(mktemp -d "${TMPDIR:-/tmp}/cimsweep-slurm-XXXXXX")
chmod 755 "$work"  # munged requires the socket's directories to be searchable by everyone
mkdir -p "$work"/{munge,state,spool,log}
chmod 755 "$work/munge"

daemon_pids=()
array_jobs=()
cleanup() {
  local status=$?
  trap - EXIT
  if [ "${#array_jobs[@]}" -gt 0 ]; then scancel "${array_jobs[@]}" 2>/dev/null || true; fi
  # Stop in reverse start order: slurmd, slurmctld, munged.
  for ((i = ${#daemon_pids[@]} - 1; i >= 0; i--)); do kill "${daemon_pids[i]}" 2>/dev/null || true; done
  for pid in "${daemon_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$status" -ne 0 ] && [ "$status" -ne 77 ]; then
    for log in "$work"/log/* "$work"/run/logs/*; do
      [ -f "$log" ] || continue
      echo "---- tail of $log" >&2
      tail -n 15 "$log" >&2
    done
  fi
  if [ -n "${CIMSWEEP_KEEP_SLURM_TEST:-}" ]; then
    echo "kept $work"
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT

# Free ports for slurmctld and slurmd, so that a system Slurm or a parallel run is not disturbed.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 50); do
  ctld_port=$((20000 + RANDOM % 30000))
  slurmd_port=$((ctld_port + 1))
  port_in_use "$ctld_port" || port_in_use "$slurmd_port" || break
done

dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$work/munge/munge.key"
munged --foreground --socket="$work/munge/munge.sock" --key-file="$work/munge/munge.key" \
  --pid-file="$work/munge/munged.pid" --seed-file="$work/munge/munged.seed" \
  --log-file="$work/log/munged.log" >"$work/log/munged.out" 2>&1 &
daemon_pids+=($!)

export SLURM_CONF="$work/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=cimsweeptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$work/munge/munge.sock
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

for _ in $(seq 50); do
  [ -S "$work/munge/munge.sock" ] && break
  sleep 0.1
done
[ -S "$work/munge/munge.sock" ] || fail "munged did not start"
slurmctld -D -f "$SLURM_CONF" >"$work/log/slurmctld.out" 2>&1 &
daemon_pids+=($!)
slurmd -D -N localhost -f "$SLURM_CONF" >"$work/log/slurmd.out" 2>&1 &
daemon_pids+=($!)

deadline=$((SECONDS + 30))
until [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = "idle" ]; do
  for pid in "${daemon_pids[@]}"; do kill -0 "$pid" 2>/dev/null || fail "a Slurm daemon exited"; done
  [ "$SECONDS" -lt "$deadline" ] || fail "the node is not idle after 30 s: $(sinfo 2>&1 | tail -n 1)"
  sleep 0.5
done
echo "slurm: one-node cluster up in $((SECONDS - start_seconds)) s (ports $ctld_port, $slurmd_port)"

# Every state of each job (one line per array task); waits until none is pending or running.
job_states() { scontrol show job -o "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
wait_for_jobs() {
  local deadline=$((SECONDS + job_timeout_s))
  while job_states "$1" | grep -qE 'PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUE|SUSPENDED' ||
    job_states "$2" | grep -qE 'PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUE|SUSPENDED'; do
    [ "$SECONDS" -lt "$deadline" ] || fail "jobs $1 and $2 not finished after $job_timeout_s s"
    sleep 1
  done
}
# Job ids from the "submitted job array A … and merge job M" line of `cimsweep slurm --submit`.
submitted_ids() { sed -n 's/^cimsweep: submitted job array \([0-9]*\) .* merge job \([0-9]*\) .*/\1 \2/p'; }

cat >"$work/tiny.toml" <<EOF
# The shipped Fashion-MNIST ResNet-20 on 40 images: 1 clean reference + σ = 0's one chip (all chips
# are the same there) + σ = 0.1's 2 trials = 4 units.
name = "slurm-test"
data = "$data"
limit = 40
trials = 2
sigmas = [0.0, 0.1]

[[models]]
label = "ResNet-20 (Fashion-MNIST)"
path = "$source_dir/models/fmnist-resnet20.safetensors"
EOF
run="$work/run"
slurm_args=("$work/tiny.toml" --shards 3 --results-dir "$run" --gpus-per-task 0 --cpus-per-task 1
  --time 00:05:00)

# 1. Task 1 fails: its results file is a directory.
mkdir -p "$run/shard-1.jsonl"
"$binary" slurm "${slurm_args[@]}" --submit | tee "$work/submit1.txt"
read -r array1 merge1 < <(submitted_ids <"$work/submit1.txt") || true
[ -n "${merge1:-}" ] || fail "no job ids in the output of cimsweep slurm --submit"
array_jobs+=("$array1" "$merge1")
wait_for_jobs "$array1" "$merge1"
task_states=$(scontrol show job -o "$array1" | grep -o 'ArrayTaskId=[0-9]* .*JobState=[A-Z_]*' |
  sed -E 's/ArrayTaskId=([0-9]+) .*JobState=([A-Z_]+)/\1=\2/' | sort | tr '\n' ' ')
[ "$task_states" = "0=COMPLETED 1=FAILED 2=COMPLETED " ] || fail "array task states: $task_states"
merge_state=$(job_states "$merge1")
[ "$merge_state" = "CANCELLED" ] || fail "the merge job after a failed task is $merge_state, not CANCELLED"
[ ! -e "$run/merged.jsonl" ] || fail "merged.jsonl exists although a task failed"
echo "slurm: task 1 failed as arranged, its merge job was cancelled"

# 2. Fix the cause and resubmit task 1 alone, with a fresh merge job.
rmdir "$run/shard-1.jsonl"
"$binary" slurm "${slurm_args[@]}" --only-tasks 1 --submit | tee "$work/submit2.txt"
grep -q '^#SBATCH --array=1$' "$run/cimsweep-slurm-test-retry.sbatch" ||
  fail "the retry script does not hold --array=1"
read -r array2 merge2 < <(submitted_ids <"$work/submit2.txt") || true
[ -n "${merge2:-}" ] || fail "no job ids in the output of cimsweep slurm --only-tasks 1 --submit"
array_jobs+=("$array2" "$merge2")
wait_for_jobs "$array2" "$merge2"
[ "$(job_states "$array2")" = "COMPLETED" ] || fail "retried task: $(job_states "$array2")"
[ "$(job_states "$merge2")" = "COMPLETED" ] || fail "merge job: $(job_states "$merge2")"

# 3. The merged results against the same sweep run here in one piece.
"$binary" sweep --spec "$work/tiny.toml" --quiet --results "$work/local.jsonl" --output "$work/local.md"
"$binary" sweep --spec "$work/tiny.toml" --quiet --results "$work/local.jsonl" --resume \
  --format csv --output "$work/local.csv"
"$binary" merge "$run/merged.jsonl" --format csv --output "$work/merged.csv"
cmp "$work/local.md" "$run/table.md" || fail "table.md of the merge job differs from the unsharded table:
$(diff "$work/local.md" "$run/table.md")"
cmp "$work/local.csv" "$work/merged.csv" || fail "merged csv table differs from the unsharded one:
$(diff "$work/local.csv" "$work/merged.csv")"
# Keys are written sorted, so "sigma" precedes "trial": (model, sigma, trial) identifies a unit.
records=$(wc -l <"$run/merged.jsonl")
units=$(sed -E 's/.*"model":("[^"]*").*"sigma":([^,]*),.*"trial":(-?[0-9]+).*/\1 \2 \3/' \
  "$run/merged.jsonl" | sort -u | wc -l)
if [ "$records" -ne 4 ] || [ "$units" -ne 4 ]; then
  fail "merged.jsonl holds $records records of $units distinct units; expected 4 and 4"
fi

cat "$run/table.md"
echo "PASS: Slurm job array of 3 shards, a failed task retried alone, merged table equals the" \
  "unsharded one; wall time $((SECONDS - start_seconds)) s"
