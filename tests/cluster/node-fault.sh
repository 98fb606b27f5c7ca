#!/usr/bin/env bash
# An operator's node faults on the test cluster, for tests/test_slurm_faults.py. Root only; up.sh lets the test
# user run it through sudo (when no one else can change this file).
#
#   node-fault.sh freeze NODE   NODE stops answering, as a hung or cut-off machine does: its slurmd, its job steps'
#                               slurmstepd and their tasks get SIGSTOP. No process exits and no connection closes,
#                               so peers on other nodes see nothing but silence; slurmctld marks the node DOWN after
#                               SlurmdTimeout and ends its jobs as NODE_FAIL.
#   node-fault.sh revive NODE   NODE comes back as after a reboot: its frozen processes are killed and its slurmd is
#                               started again; ReturnToService=2 returns it to service once it registers.
set -euo pipefail
# shellcheck source=up.sh
source "$(dirname "${BASH_SOURCE[0]}")/up.sh"

usage() { echo "usage: $0 freeze|revive NODE (NODE one of ${NODES[*]})" >&2; exit 2; }
(($# == 2)) || usage
action=$1 node=$2
[[ " ${NODES[*]} " == *" $node "* ]] || usage
[[ $(id -u) == 0 ]] || die "must run as root"

node_processes() {  # NODE's slurmd, then every task of its job steps (SLURMD_NODENAME=NODE) and its slurmstepd
    local p pid stat
    pid_of "slurmd-$node" && echo
    for p in /proc/[0-9]*; do
        tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qx "SLURMD_NODENAME=$node" || continue
        pid=${p#/proc/}
        while ((pid > 1)); do  # up to the task's slurmstepd
            echo "$pid"
            [[ $(cat "/proc/$pid/comm" 2>/dev/null) != slurmstepd ]] || break
            stat=$(cat "/proc/$pid/stat" 2>/dev/null) || break
            stat=${stat##*) }
            read -r _ pid _ <<<"$stat"
        done
    done | awk 'NF && !seen[$0]++'
}

case $action in
    freeze)
        mapfile -t pids < <(node_processes)
        ((${#pids[@]})) || die "nothing of $node is running"
        kill -STOP "${pids[@]}" 2>/dev/null || true
        log "$node frozen: SIGSTOP to ${#pids[@]} processes (slurmd $(pid_of "slurmd-$node"))"
        ;;
    revive)
        umask 022 && cd /  # as up.sh starts the daemons
        mapfile -t pids < <(node_processes)
        ((${#pids[@]} == 0)) || kill -KILL "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 50); do
            daemon_alive "slurmd-$node" || break
            sleep 0.1
        done
        start "slurmd-$node" slurmd -D -N "$node"
        wait_for "slurmd-$node" "$node back in service" nodes_up  # a requeued job may take it at once
        log "$node revived"
        ;;
    *) usage ;;
esac
