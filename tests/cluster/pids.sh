# Sourced by up.sh and down.sh: how the test cluster tells whether a recorded daemon PID is still ours.

# A PID counts as running only if it exists, is not a zombie, and is the
# expected program (PIDs get reused after a reboot or a purge).
alive() {
    local pid=$1 name=$2 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != [ZX] ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]
}
