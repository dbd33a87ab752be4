#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try scripts/slurm/*.sbatch on a laptop and to run
# tests/slurm/. Needs root (it installs packages and starts daemons). Safe to run again: every
# step is skipped when it is already done.
#
#   sudo scripts/slurm/local_cluster.sh          # install (Debian/Ubuntu) + configure + start
#   sudo scripts/slurm/local_cluster.sh --stop   # stop slurmd, slurmctld and munged
#
# The node is named after `hostname -s` and declares at least 8 CPUs (SlurmdParameters=
# config_overrides), so a few small test jobs run side by side even on a 2-core machine. The
# config shortens SLURM's waits for quick tests: a requeued job may start again after
# cred_expire (15 s, default 120), the scheduler looks at pending jobs every 2 s (default 60),
# and a job past its time limit gets KillWait=10 s between SIGTERM and SIGKILL (default 30).
# It writes /etc/slurm/slurm.conf only when there is none or the one there is ours (first line).
# Daemons talk over 127.0.0.1, so the host name need not resolve.
set -euo pipefail

MARK="# optuna-guard local cluster (scripts/slurm/local_cluster.sh)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid

say() { echo "local_cluster: $*"; }
fail() { echo "local_cluster: $*" >&2; exit 1; }
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop the daemon whose PID is in $1, by that PID only
    local pidfile=$1 pid
    alive "$pidfile" || return 0
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

if [[ "${1:-}" == "--stop" ]]; then
    stop_pidfile "$SLURMD_PID"
    stop_pidfile "$CTLD_PID"
    stop_pidfile "$MUNGE_PID"
    say "stopped"
    exit 0
fi
[[ $# -eq 0 ]] || fail "unknown argument ${1}; use no argument to start or --stop to stop."
[[ "$(id -u)" == 0 ]] || fail "must run as root (it installs packages and starts daemons); try sudo $0."

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm-wlm and munge are not installed and there is no apt-get; install them by hand."
    say "installing slurm-wlm and munge with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# 2. Munge key and daemon (runs as the munge user the package created).
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
chown munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
if [[ ! -s "$MUNGE_KEY" ]]; then
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"
if ! alive "$MUNGE_PID"; then
    runuser -u munge -- /usr/sbin/munged
fi

# 3. slurm.conf for one node.
HOST="$(hostname -s)"
CPUS="$(nproc)"; (( CPUS < 8 )) && CPUS=8
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
if [[ ! -e "$CONF" ]] || head -n1 "$CONF" | grep -qF "$MARK"; then
    NEW="$(mktemp)"
    cat > "$NEW" <<EOF
$MARK
ClusterName=optuna-guard-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=15
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobRequeue=1
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=10
MinJobAge=600
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$NEW" "$CONF"; then
        mv "$NEW" "$CONF"
        chmod 0644 "$CONF"
        CHANGED=1
    else
        rm -f "$NEW"
    fi
else
    say "keeping the existing $CONF (not written by this script)"
fi

# 4. Daemons (a changed config restarts them).
if [[ -n "${CHANGED:-}" ]]; then
    stop_pidfile "$SLURMD_PID"
    stop_pidfile "$CTLD_PID"
fi
alive "$CTLD_PID" || /usr/sbin/slurmctld
alive "$SLURMD_PID" || /usr/sbin/slurmd

# 5. Wait until a job step runs.
for _ in $(seq 1 60); do
    if state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null)" && [[ "$state" == down* || "$state" == drain* ]]; then
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    fi
    if timeout 20 srun --immediate=10 -N1 -n1 hostname >/dev/null 2>&1; then
        say "running: one node $HOST, $CPUS CPUs, $MEM_MB MB (logs in $LOG_DIR)"
        exit 0
    fi
    sleep 1
done
fail "SLURM did not come up within a minute; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log."
