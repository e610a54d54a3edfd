#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, then the demo through the
# shipped profile (workflow/profiles/slurm) with the SLURM executor plugin, and
# its outputs compared with a local run's. Called by .ci/run; also usable alone:
#
#   .ci/slurm.sh PYTHON            # PYTHON: the interpreter with hetrefine installed
#   .ci/slurm.sh PYTHON -- CMD...  # only start the cluster, run CMD on it, stop it
#                                  # (e.g. -- PYTHON -m pytest tests/test_slurm.py)
#
# HETREFINE_CI_GPUS=N declares N GPUs on the node (a generic resource without
# devices: jobs asking `--gres=gpu:1` are scheduled and run on the CPU), to run
# the slurm-gpu profile; without it the node has no GPU and SLURM refuses any
# GPU request, as a CPU-only partition does.
#
# Needs root and apt-get (Debian: slurm-wlm + munge). Where either is missing
# it says so and exits 0: the SLURM check is skipped, loudly, not failed.
# Everything lives in a temporary folder; /etc/slurm/slurm.conf (where the
# jobs' own SLURM commands look) is a link to it, made only where no SLURM
# configuration exists and removed at the end. The daemons are stopped by the
# PIDs they wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
case $PY in /*) ;; */*) PY="$PWD/$PY" ;; esac  # the demos run in other folders
[ "${2:-}" = "--" ] && [ $# -lt 3 ] && { echo "usage: $0 PYTHON [-- CMD...]" >&2; exit 2; }
ROOT=$PWD

skip() { echo "SLURM CHECK SKIPPED: $*" >&2; exit 0; }

[ "$(id -u)" = 0 ] || skip "not root (the daemons need root to start without systemd)"
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install slurm-wlm and munge"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
        || skip "apt-get could not install slurm-wlm and munge"
fi
"$PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null \
    || skip "snakemake-executor-plugin-slurm is not installed in $PY's environment"

[ -e /etc/slurm/slurm.conf ] \
    && skip "/etc/slurm/slurm.conf exists: this machine has a SLURM configuration, not replacing it"

WORK=$(mktemp -d /tmp/hetrefine-slurm.XXXXXX)
export SLURM_CONF=$WORK/slurm.conf
mkdir -p /etc/slurm
ln -s "$SLURM_CONF" /etc/slurm/slurm.conf
stop_daemons() {
    # Only the daemons this script started, by the PIDs they wrote.
    for name in slurmd slurmctld munged; do
        if [ -f "$WORK/$name.pid" ]; then
            pid=$(cat "$WORK/$name.pid")
            kill "$pid" 2>/dev/null && echo "stopped $name (pid $pid)"
        fi
    done
    [ "$(readlink /etc/slurm/slurm.conf)" = "$SLURM_CONF" ] && rm -f /etc/slurm/slurm.conf
    return 0
}
trap stop_daemons EXIT

# --- munge: its own key, socket and pid file in $WORK
mkdir -p "$WORK/munge"
dd if=/dev/urandom bs=1 count=1024 of="$WORK/munge/munge.key" status=none
chmod 0400 "$WORK/munge/munge.key"
munged --force --key-file="$WORK/munge/munge.key" --socket="$WORK/munge/munge.socket" \
    --pid-file="$WORK/munged.pid" --log-file="$WORK/munged.log" --seed-file="$WORK/munge/seed"

# --- slurm.conf for this one node, from what slurmd sees
NODE=$(slurmd -C | head -1)
GPUS=${HETREFINE_CI_GPUS:-}
NODENAME=$(echo "$NODE" | sed 's/^NodeName=\([^ ]*\).*/\1/')
mkdir -p "$WORK/state" "$WORK/spool"
cat > "$SLURM_CONF" <<EOF
ClusterName=hetrefine-ci
SlurmctldHost=$NODENAME
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$WORK/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MinJobAge=300
ReturnToService=2
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
$NODE${GPUS:+ Gres=gpu:$GPUS} State=UNKNOWN
${GPUS:+GresTypes=gpu}
PartitionName=main Nodes=$NODENAME Default=YES MaxTime=INFINITE State=UP
EOF
sed -i '/^UpTime=/d' "$SLURM_CONF"
if [ -n "$GPUS" ]; then
    echo "NodeName=$NODENAME Name=gpu File=/dev/null Count=$GPUS" > "$WORK/gres.conf"
fi

slurmctld -c   # -c: a clean start, no state from an earlier cluster
slurmd
for _ in $(seq 60); do
    sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)' && break
    sleep 1
done
sinfo -h -o %T | grep -qE '^(idle|mixed)' || { cat "$WORK/slurmctld.log" "$WORK/slurmd.log" >&2; echo "SLURM did not come up" >&2; exit 1; }
echo "SLURM is up: $(sinfo -h -o '%P %D nodes, %c CPUs, %m MB, %T')"

if [ "${2:-}" = "--" ]; then
    shift 2
    "$@"
    exit $?
fi

# --- the demo twice: locally and through the profile, in two copies of the workflow
run_demo() {  # $1: folder, $2..: snakemake arguments
    local dir=$1; shift
    mkdir -p "$dir"
    cp -r Snakefile config.yaml workflow profiles envs scripts "$dir/"
    (cd "$dir" && "$PY" -m snakemake "$@")
}
start=$(date +%s)
run_demo "$WORK/local" --cores 2 --config run=demo > "$WORK/local.log" 2>&1 \
    || { tail -50 "$WORK/local.log"; exit 1; }
local_s=$(( $(date +%s) - start ))
start=$(date +%s)
# The shipped profile, unchanged; only the run name on the command line.
run_demo "$WORK/cluster" --profile workflow/profiles/slurm --config run=demo 2>&1 | tee "$WORK/cluster.log" \
    || { echo "the SLURM run failed" >&2; exit 1; }
cluster_s=$(( $(date +%s) - start ))
submitted=$(grep -c "Job .* has been submitted with SLURM jobid" "$WORK/cluster.log" || true)
echo "demo: local ${local_s} s; through SLURM ${cluster_s} s, ${submitted} sbatch jobs"
[ "$submitted" -gt 0 ] || { echo "no job went through sbatch" >&2; exit 1; }

"$PY" "$ROOT/.ci/compare_runs.py" "$WORK/local/results/demo" "$WORK/cluster/results/demo"
"$PY" "$ROOT/bench/slurm_overhead.py" "$WORK/local" "$WORK/cluster"
if [ -z "$GPUS" ]; then
    # What the plain profile is for: this node has no GPU, and SLURM refuses GPU requests.
    if sbatch --gres=gpu:1 --wrap=true >/dev/null 2>"$WORK/gpu_refused.txt"; then
        echo "a CPU-only node accepted --gres=gpu:1" >&2; exit 1
    fi
    echo "as on a CPU-only partition, a GPU request is refused: $(cat "$WORK/gpu_refused.txt")"
fi
echo "SLURM CHECK PASSED"
