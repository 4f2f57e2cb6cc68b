#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster (munged + slurmctld + slurmd) on
# this machine, for the SLURM tests of the workflow profile profiles/slurm.
#
# Idempotent: if the cluster is already up and the node is usable, exit 0
# without touching anything; start only the daemons that are not running.
# Needs root (apt-get, munge key, daemons as root). No systemd needed.
#
# Environment:
#   QBREAK_SLURM_DIR   state/spool/log/pid directory (default /tmp/qbreak-slurm)
#   QBREAK_SLURM_WAIT  seconds to wait for the controller and node (default 60)
#
# The config is written to $QBREAK_SLURM_DIR/slurm.conf and, once the cluster
# is up, linked to /etc/slurm/slurm.conf (where sbatch/squeue/srun look), so no
# SLURM_CONF variable is needed by clients. An existing /etc/slurm/slurm.conf
# that this script did not write is left alone; then export SLURM_CONF.
# On failure: exit 1 with one line "start-cluster: <reason>" on stderr.
set -u -o pipefail

DIR="${QBREAK_SLURM_DIR:-/tmp/qbreak-slurm}"
WAIT="${QBREAK_SLURM_WAIT:-60}"
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MARK="# written by qbreak tests/slurm/start-cluster.sh"
export SLURM_CONF="$CONF"  # our scontrol/sinfo calls below read our config

die() { echo "start-cluster: $*" >&2; exit 1; }

# shellcheck source=tests/slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

node_state() {  # state of our node ("idle", "mix", "alloc", "down*", ...) or empty
    sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1
}

ctld_up() {  # a controller answers, and it is ours (not one of another state dir)
    scontrol ping 2>/dev/null | grep -q 'is UP' &&
        [ "$(scontrol show config 2>/dev/null | awk '$1 == "StateSaveLocation" { print $3 }')" = "$DIR/state" ]
}

usable() {  # node can run jobs
    case "$(node_state)" in idle | mix | alloc | comp | idle~) return 0 ;; *) return 1 ;; esac
}

link_conf() {  # clients (sbatch, squeue, srun in jobs) read /etc/slurm/slurm.conf
    [ "$(readlink "$ETC_CONF" 2>/dev/null)" = "$CONF" ] && return 0
    mkdir -p /etc/slurm
    if [ -L "$ETC_CONF" ] || [ ! -e "$ETC_CONF" ] || grep -qF "$MARK" "$ETC_CONF" 2>/dev/null; then
        ln -sfn "$CONF" "$ETC_CONF"
    else
        echo "start-cluster: note: $ETC_CONF is not ours; clients need SLURM_CONF=$CONF" >&2
    fi
}

[ "$(id -u)" = 0 ] || die "must run as root"

# ---------------------------------------------------------------- install ----
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null ||
    ! command -v slurmd >/dev/null || ! command -v munged >/dev/null ||
    ! command -v ps >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    pkgs="slurmctld slurmd slurm-client munge procps"
    # Wait for a concurrent apt/dpkg run instead of failing on its lock.
    apt="apt-get -o DPkg::Lock::Timeout=300 -y -qq"
    # Package lists may be missing in a fresh container: update only then.
    if ! $apt install --no-install-recommends $pkgs >"/tmp/qbreak-slurm-apt.log" 2>&1; then
        { $apt update && $apt install --no-install-recommends $pkgs; } \
            >>"/tmp/qbreak-slurm-apt.log" 2>&1 ||
            die "apt-get install $pkgs failed (see /tmp/qbreak-slurm-apt.log)"
    fi
fi
for b in sbatch squeue scontrol sinfo slurmctld slurmd munged ps; do
    command -v "$b" >/dev/null || die "$b not found after install"
done

NODE=$(hostname -s)
[ -n "$NODE" ] || die "empty hostname -s"

# -------------------------------------------------- already up? do nothing ----
if alive "$MUNGE_PID" munged && alive "$DIR/slurmctld.pid" slurmctld && alive "$DIR/slurmd.pid" slurmd &&
    ctld_up && usable; then
    link_conf
    exit 0
fi

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" || die "cannot create $DIR"

# ------------------------------------------------------------------ munge ----
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s "$MUNGE_KEY" ]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$MUNGE_KEY" --force >/dev/null 2>&1
    fi
    [ -s "$MUNGE_KEY" ] || dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
fi
chown munge:munge "$MUNGE_KEY" && chmod 0400 "$MUNGE_KEY" || die "cannot set up $MUNGE_KEY"

if ! alive "$MUNGE_PID" munged; then
    rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged >"$DIR/log/munged.out" 2>&1 ||
        die "munged failed to start: $(tail -n1 "$DIR/log/munged.out" 2>/dev/null)"
fi
for _ in $(seq 1 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.2
done
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munge round trip fails (munged not working)"

# ----------------------------------------------------------------- config ----
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
[ "${MEM_MB:-0}" -gt 0 ] || die "cannot read MemTotal"

cat >"$CONF.new" <<EOF
$MARK
# One node, no accounting database, no cgroups: for tests only.
ClusterName=qbreak
SlurmctldHost=$NODE
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
# Finished jobs stay visible to squeue/scontrol for 10 min: the executor
# plugin polls squeue (no sacct without accounting).
MinJobAge=3600
# Reject at sbatch time a job that can never run here (e.g. threads: 8 on a
# 2-CPU node) instead of leaving it PENDING (PartitionConfig) forever.
EnforcePartLimits=ALL
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; else mv "$CONF.new" "$CONF"; fi

# ---------------------------------------------------------------- daemons ----
if ! alive "$DIR/slurmctld.pid" slurmctld; then
    rm -f "$DIR/slurmctld.pid"
    # daemonizes itself and writes SlurmctldPidFile; keeps job state across restarts
    slurmctld -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 ||
        die "slurmctld failed to start: $(tail -n1 "$DIR/log/slurmctld.out") (see $DIR/log/slurmctld.log)"
fi
if ! alive "$DIR/slurmd.pid" slurmd; then
    rm -f "$DIR/slurmd.pid"
    slurmd -f "$CONF" >"$DIR/log/slurmd.out" 2>&1 ||
        die "slurmd failed to start: $(tail -n1 "$DIR/log/slurmd.out") (see $DIR/log/slurmd.log)"
fi

deadline=$((SECONDS + WAIT))
until ctld_up; do
    [ $SECONDS -lt $deadline ] || die "slurmctld not UP after ${WAIT}s (see $DIR/log/slurmctld.log)"
    alive "$DIR/slurmctld.pid" slurmctld || [ $SECONDS -lt 3 ] ||
        die "slurmctld died: $(tail -n1 "$DIR/log/slurmctld.log" 2>/dev/null)"
    sleep 0.5
done
resumed=0
until usable; do
    [ $SECONDS -lt $deadline ] ||
        die "node $NODE not idle after ${WAIT}s (state '$(node_state)': $(sinfo -h -N -n "$NODE" -o %E 2>/dev/null); see $DIR/log/slurmd.log)"
    case "$(node_state)" in
    drain* | drng* | down | fail*)
        # left over from an earlier run (e.g. killed slurmd): put it back
        [ $resumed = 1 ] || scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1
        resumed=1
        ;;
    esac
    sleep 0.5
done
# A daemon that lost the race for its port exits after daemonizing: check again.
sleep 0.5
alive "$DIR/slurmctld.pid" slurmctld ||
    die "slurmctld exited: $(tail -n1 "$DIR/log/slurmctld.log" 2>/dev/null)"
alive "$DIR/slurmd.pid" slurmd ||
    die "slurmd exited: $(tail -n1 "$DIR/log/slurmd.log" 2>/dev/null)"
link_conf  # only now, so a failed start leaves a working cluster's link alone
exit 0
