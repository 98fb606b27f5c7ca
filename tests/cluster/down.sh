#!/usr/bin/env bash
# Stop the test Slurm cluster started by up.sh: cancel jobs, stop every daemon by
# its recorded PID, kill job processes left behind. Idempotent; exit 0 when
# nothing runs.
#   --purge  also delete the state directory (Slurm state, accounting DB, logs),
#            so job ids restart at 1 on the next up.sh.
#   --quiet  no progress messages.
# Env: FTLIB_SLURM_DIR (default /tmp/ftlib-slurm).
set -euo pipefail

DIR=$(realpath -m "${FTLIB_SLURM_DIR:-/tmp/ftlib-slurm}")
PURGE=0 QUIET=0
for arg in "$@"; do
    case $arg in
        --purge) PURGE=1 ;;
        --quiet) QUIET=1 ;;
        *) echo "usage: $0 [--purge] [--quiet]" >&2; exit 2 ;;
    esac
done

log() { ((QUIET)) || echo "[cluster-down] $*"; }

# shellcheck source=pids.sh
source "$(dirname "${BASH_SOURCE[0]}")/pids.sh"

# Stop order: compute nodes first, the things everyone depends on last.
ordered_pidfiles() {
    local f
    for f in "$DIR"/pids/slurmd-*.pid; do [[ -e $f ]] && echo "$f"; done
    for f in slurmctld slurmdbd mariadbd munged; do
        [[ -e $DIR/pids/$f.pid ]] && echo "$DIR/pids/$f.pid"
    done
    return 0
}

stop() {  # stop PIDFILE: TERM, wait, then KILL
    local file=$1 name pid
    name=$(basename "$file" .pid)
    pid=$(cat "$file" 2>/dev/null || true)
    # slurmctld saves state and MariaDB flushes InnoDB on TERM: give them time.
    # slurmd keeps nothing worth waiting for (it can hang on a dead slurmctld).
    local grace=30
    [[ $name != slurmd-* ]] || grace=10
    if alive "$pid" "${name%%-*}"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq $((grace * 10))); do
            alive "$pid" "${name%%-*}" || break
            sleep 0.1
        done
        if alive "$pid" "${name%%-*}"; then
            log "$name did not exit after ${grace}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            for _ in $(seq 50); do alive "$pid" "${name%%-*}" || break; sleep 0.1; done
        fi
    fi
    rm -f "$file"
}

# Cancel jobs first: their slurmstepd and task processes would otherwise
# outlive slurmd and keep running after the cluster is "down".
cancel_jobs() {
    local pid
    pid=$(cat "$DIR/pids/slurmctld.pid" 2>/dev/null || true)
    alive "$pid" slurmctld || return 0
    [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null) ]] || return 0
    log "cancelling running jobs"
    timeout 10 scancel --partition=debug 2>/dev/null || true
    for _ in $(seq 40); do  # KillWait=5 plus slack
        [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null) ]] || return 0
        sleep 0.5
    done
    log "jobs still listed after 20s; stopping anyway"
}

# PIDs of job steps of our nodes that are still running (jobs that could not be
# cancelled, e.g. slurmctld was already dead): each slurmstepd listens on a
# socket in our spool dir; with proctrack/cgroup every job process of node K is
# under the freezer cgroup slurm_K; else take the slurmstepd process trees.
leftover_job_pids() {
    local stepds node
    stepds=$(ss -Hxlp 2>/dev/null | grep -F " $DIR/spool/" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u)
    for node in "$DIR"/spool/*/; do
        node=$(basename "$node")
        [[ -d /sys/fs/cgroup/freezer/slurm_$node ]] &&
            find "/sys/fs/cgroup/freezer/slurm_$node" -name cgroup.procs -exec cat {} +
    done
    [[ -n $stepds ]] || return 0
    ps -eo pid=,ppid= | awk -v roots="${stepds//$'\n'/ }" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END { do { grew = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 } } while (grew)
              for (p in keep) print p }'
}

if [[ -d $DIR/pids ]]; then
    cancel_jobs
    mapfile -t files < <(ordered_pidfiles)
    for f in "${files[@]}"; do stop "$f"; done
    mapfile -t left < <(leftover_job_pids | sort -u)
    if ((${#left[@]})); then
        log "killing ${#left[@]} leftover job processes: ${left[*]}"
        kill -KILL "${left[@]}" 2>/dev/null || true
    fi
fi

if ((PURGE)) && [[ -d $DIR ]]; then
    # Only delete a directory up.sh created (guards against FTLIB_SLURM_DIR=/ or ~).
    [[ -e $DIR/.ftlib-slurm ]] || { echo "[cluster-down] refusing to purge $DIR: no .ftlib-slurm marker" >&2; exit 1; }
    log "removing $DIR"
    rm -rf -- "$DIR"
fi
log "down"
