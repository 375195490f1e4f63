#!/usr/bin/env bash
# A real SLURM cluster on this one Debian machine, for tests and for trying the sbatch
# scripts: munged, slurmctld and two slurmd daemons (two node names on one host, so
# multi-node jobs run too). Must run as root.
#
#   scripts/slurm_cluster.sh up       install slurm-wlm + munge if absent, write the
#                                     configs, start what is not running, wait for idle nodes
#   scripts/slurm_cluster.sh status   daemons, nodes, queue (exit 1 unless all are up)
#   scripts/slurm_cluster.sh down     stop the daemons this script started
#
# Idempotent: `up` on a running cluster with the same config returns at once; concurrent
# callers serialise on a lock. Environment (defaults in brackets):
#   DISSECT_SLURM_NODES     node names on this host [2]; 1 gives a single node named `hostname`
#   DISSECT_SLURM_CPUS      CPUs advertised per node [online CPUs, at least 2]
#   DISSECT_SLURM_PORT      first slurmd port [17001]; slurmctld listens on 16817
#   DISSECT_SLURM_NO_INSTALL=1  never call apt-get (fail when slurm is missing)
set -euo pipefail

NODES=${DISSECT_SLURM_NODES:-2}
# Online CPUs (not nproc: it follows OMP_NUM_THREADS), at least 2 so that 2-rank jobs fit
# on one node of even a 1-CPU machine (config_overrides below lets a node claim more).
CPUS=${DISSECT_SLURM_CPUS:-$(($(getconf _NPROCESSORS_ONLN) > 2 ? $(getconf _NPROCESSORS_ONLN) : 2))}
PORT0=${DISSECT_SLURM_PORT:-17001}
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf
MARK="# written by dissect_ds scripts/slurm_cluster.sh"
RUN=/run/dissect-slurm
LOGDIR=/var/log/slurm
SPOOL=/var/spool/dissect-slurm

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

node_names() {
    # The first node carries the host's name (what `slurmd` alone would claim); the
    # others are extra names served by further slurmd processes on the same host.
    echo "$HOST"
    for ((i = 2; i <= NODES; i++)); do echo "$HOST-n$i"; done
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

lock() {
    install -d -m 0755 "$RUN"
    exec 9>"$RUN/lock"
    flock -w 900 9 || die "another slurm_cluster.sh holds $RUN/lock"
}

# Start a daemon without our lock (fd 9) or our stdout/stderr: daemons would hold the
# lock forever and keep a caller's pipe open (subprocess.run(capture_output=True) hangs).
start() {
    local name=$1
    shift
    if ! "$@" </dev/null >"$RUN/$name.start.log" 2>&1 9>&-; then
        cat "$RUN/$name.start.log" >&2
        die "$name failed to start (see also $LOGDIR)"
    fi
}

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ ${DISSECT_SLURM_NO_INSTALL:-0} == 1 ]] && die "missing ${missing[*]} and DISSECT_SLURM_NO_INSTALL=1"
    log "installing slurm-wlm and munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts may start services: keep them off our lock and our output pipes.
    if ! { apt-get -o DPkg::Lock::Timeout=600 update -q &&
        apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends slurm-wlm slurm-client munge; } \
        </dev/null >"$RUN/apt.log" 2>&1 9>&-; then
        tail -n 40 "$RUN/apt.log" >&2
        die "apt-get failed (log: $RUN/apt.log)"
    fi
}

write_munge_key() {
    local key=/etc/munge/munge.key
    [[ -s $key ]] && return
    log "writing $key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$key" --force
    else
        dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    fi
    chown munge:munge "$key"
    chmod 0400 "$key"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    log "starting munged"
    install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
    start munged runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

render_conf() {
    cat <<EOF
$MARK
# One host, cgroup-free (works in containers): processes are tracked through /proc.
ClusterName=dissect
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Nodes as written here, whatever slurmd detects (several slurmd share this host's CPUs).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to 'scontrol show job' for a day (no slurmdbd, so no sacct).
MinJobAge=86400
KillWait=30
SlurmctldTimeout=60
SlurmdTimeout=60
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
EOF
    local i=0 name
    for name in $(node_names); do
        echo "NodeName=$name NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT0 + i)) CPUs=$CPUS State=UNKNOWN"
        i=$((i + 1))
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

all_running() {
    alive "$RUN/slurmctld.pid" || return 1
    local name
    for name in $(node_names); do alive "$RUN/slurmd-$name.pid" || return 1; done
}

stop_daemons() {
    local pidfile pid
    for pidfile in "$RUN"/slurmd-*.pid "$RUN"/slurmctld.pid; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping $(basename "$pidfile" .pid) (pid $pid)"
            kill -TERM "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
        rm -f "$pidfile"
    done
}

wait_idle() {
    local want n state
    want=$(node_names | wc -l)
    for _ in $(seq 120); do
        # Nodes left down or drained by an earlier run (e.g. a killed slurmd) come back.
        for n in $(sinfo -h -N -t down,drain,fail -o %N 2>/dev/null | sort -u); do
            scontrol update nodename="$n" state=resume 2>/dev/null || true
        done
        state=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc|comp)' || true)
        [[ $state -ge $want ]] && return
        sleep 1
    done
    sinfo -N >&2 || true
    die "nodes not ready after 120 s (logs in $LOGDIR)"
}

cmd_up() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (starts munged, slurmctld, slurmd)"
    lock
    install_packages
    write_munge_key
    start_munge
    install -d -m 0755 /etc/slurm "$LOGDIR" "$SPOOL" "$SPOOL/ctld"
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching it"
    fi
    local new
    new=$(render_conf)
    if [[ ! -f $CONF ]] || [[ $new != "$(cat "$CONF")" ]]; then
        stop_daemons
        log "writing $CONF"
        printf '%s\n' "$new" >"$CONF"
    fi
    if ! alive "$RUN/slurmctld.pid"; then
        log "starting slurmctld"
        # -c: a controller that was not running starts from a clean slate; jobs of a cluster
        # that died (a reboot, a killed test session) must not be requeued onto this one.
        start slurmctld slurmctld -c
    fi
    local name
    for name in $(node_names); do
        if ! alive "$RUN/slurmd-$name.pid"; then
            install -d -m 0755 "$SPOOL/d-$name"
            log "starting slurmd for node $name"
            start "slurmd-$name" slurmd -N "$name"
        fi
    done
    wait_idle
    log "up: $(sinfo -h -o '%P %D nodes %C cpus(A/I/O/T) %t' | head -1)"
}

cmd_down() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    lock
    stop_daemons
    if [[ -f /run/munge/munged.pid ]] && grep -qF "$MARK" "$CONF" 2>/dev/null; then
        local pid
        pid=$(cat /run/munge/munged.pid)
        kill -0 "$pid" 2>/dev/null && { log "stopping munged (pid $pid)"; kill -TERM "$pid"; }
    fi
    log "down"
}

cmd_status() {
    local ok=0 name
    if alive "$RUN/slurmctld.pid"; then echo "slurmctld: running (pid $(cat "$RUN/slurmctld.pid"))"; else echo "slurmctld: stopped"; ok=1; fi
    for name in $(node_names); do
        if alive "$RUN/slurmd-$name.pid"; then echo "slurmd $name: running"; else echo "slurmd $name: stopped"; ok=1; fi
    done
    if [[ $ok -eq 0 ]]; then
        sinfo -N
        squeue
    fi
    return $ok
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
