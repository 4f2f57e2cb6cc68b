#!/usr/bin/env bash
# Stop the test cluster started by start-cluster.sh: cancel all jobs, then stop
# slurmd, slurmctld and munged by their PID files. Idempotent; always exits 0.
# The state directory (job state, logs) is kept, so start-cluster.sh can start
# the same cluster again; delete $QBREAK_SLURM_DIR to start from scratch. The
# /etc/slurm/slurm.conf link that start-cluster.sh made goes (it links it again):
# left pointing at a stopped controller, every SLURM client call waits ~9 s for it,
# and snakemake-executor-plugin-slurm runs `scontrol show config` whenever
# snakemake starts (a no-op `snakemake` run took 13 s instead of 4 s).
set -u

DIR="${QBREAK_SLURM_DIR:-/tmp/qbreak-slurm}"
[ -f "$DIR/slurm.conf" ] && export SLURM_CONF="$DIR/slurm.conf"

# shellcheck source=tests/slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop() {  # stop PIDFILE NAME: SIGTERM, wait up to 15 s, then SIGKILL
    local pidfile=$1 pid i
    alive "$pidfile" "$2" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 75); do
        running "$pid" || break
        sleep 0.2
    done
    if running "$pid"; then
        echo "stop-cluster: $2 (pid $pid) ignored SIGTERM, killing" >&2
        kill -KILL "$pid" 2>/dev/null
        sleep 0.2
    fi
    rm -f "$pidfile"
}

if alive "$DIR/slurmctld.pid" slurmctld && command -v scancel >/dev/null; then
    scancel --quiet --partition=debug 2>/dev/null ||
        scancel --quiet --user="$(id -un)" 2>/dev/null
    # give slurmd a moment to kill the job processes
    for _ in $(seq 1 25); do
        [ -z "$(squeue -h -t RUNNING,COMPLETING,PENDING -o %i 2>/dev/null)" ] && break
        sleep 0.2
    done
fi

stop "$DIR/slurmd.pid" slurmd
stop "$DIR/slurmctld.pid" slurmctld
stop /run/munge/munged.pid munged
[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$DIR/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
exit 0
