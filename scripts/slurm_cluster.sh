#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, from Debian's packages: one slurmctld
# and two slurmd daemons (nodes n1, n2), each node its own daemon with its own port and
# spool. Needs root. Idempotent.
#
#   scripts/slurm_cluster.sh          # install if needed, configure, start, wait for idle nodes
#   scripts/slurm_cluster.sh stop     # scontrol shutdown + stop munged
#   scripts/slurm_cluster.sh status
#
# Node names are not host names: a job resolves the first node's address with
# `scontrol show node n1` (NodeAddr), as the sbatch scripts do.
set -euo pipefail

NODES=(n1 n2)
CPUS_PER_NODE=${SLURM_LOCAL_CPUS_PER_NODE:-1}
MEMORY_PER_NODE_MB=${SLURM_LOCAL_MEMORY_MB:-10000}
CONF=/etc/slurm/slurm.conf

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    [ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 400 /etc/munge/munge.key
    alive /run/munge/munged.pid || su -s /bin/sh munge -c /usr/sbin/munged
}

write_config() {
    local host conf
    host=$(hostname)
    conf=$(cat <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/var/run/slurmctld.pid
SlurmdPidFile=/var/run/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldLogFile=/var/log/slurm/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
$(port=17001; for n in "${NODES[@]}"; do
    echo "NodeName=$n NodeHostname=$host Port=$port CPUs=$CPUS_PER_NODE RealMemory=$MEMORY_PER_NODE_MB State=UNKNOWN"
    port=$((port + 1)); done)
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
CONF
)
    mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
    for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done
    # Rewrite only on change: the running daemons keep their view otherwise.
    [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$conf" ] || echo "$conf" > "$CONF"
}

start() {
    install_packages
    start_munge
    write_config
    alive /var/run/slurmctld.pid || /usr/sbin/slurmctld
    for n in "${NODES[@]}"; do
        alive "/var/run/slurmd-$n.pid" || /usr/sbin/slurmd -N "$n"
    done
    for _ in $(seq 60); do
        idle=$(sinfo -h -N -t idle,mix,alloc -o %N 2>/dev/null | sort -u | wc -l)
        [ "$idle" -ge "${#NODES[@]}" ] && { sinfo -N; return; }
        sleep 1
    done
    sinfo -N >&2
    echo "slurm_cluster.sh: the nodes did not come up within 60 s; see /var/log/slurm/" >&2
    exit 1
}

stop() {
    if alive /var/run/slurmctld.pid; then scontrol shutdown; fi
    alive /run/munge/munged.pid && kill "$(cat /run/munge/munged.pid)"
    return 0
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) sinfo -N ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
