#!/usr/bin/env bash
# Run a command (make test: pytest) as an unprivileged user, never as root.
#
#   tests/cluster/run-as-user.sh .venv/bin/python -m pytest ...
#
# As root: run it as $FTLIB_TEST_USER (default ftl-alice, created by up.sh) in the checkout, with that
# user's own HOME (its caches: Hugging Face, pytest's cache). First check that the user can reach and read the checkout and the interpreter, and write where
# the suite writes in the checkout (cache/); fix what is missing minimally and say so:
#   - a directory on the way that others cannot traverse (e.g. /root for a clone or a pyenv under it)
#     gets o+x (traverse only, no listing);
#   - cache/ gets an ACL entry giving the user rwx (setfacl; chown when there is no setfacl).
# Unreadable files in the checkout are not changed: it stops and names them. It also mounts a 64 MB tmpfs
# owned by the user on $FTLIB_SMALL_FS (default /tmp/ftlib-small-fs) for tests/test_disk_full.py.
# As any other user: run the command unchanged, as that user.
set -euo pipefail

if [[ $(id -u) != 0 ]]; then exec "$@"; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
USER_NAME=${FTLIB_TEST_USER:-ftl-alice}
WRITABLE=(cache)  # folders of the checkout the suite writes into (tests/test_recipe.py: cache/roundtrip-*)

log() { echo "[run-as-user] $*" >&2; }
die() { echo "[run-as-user] ERROR: $*" >&2; exit 1; }
as_user() { runuser -u "$USER_NAME" -- "$@"; }

(($#)) || die "usage: $0 COMMAND [ARGS...]"
getent passwd "$USER_NAME" >/dev/null ||
    die "no user $USER_NAME: bring the test cluster up first (bash tests/cluster/up.sh creates it)"
HOME_DIR=$(getent passwd "$USER_NAME" | cut -d: -f6)
[[ -d $HOME_DIR ]] || die "$USER_NAME's home $HOME_DIR does not exist (bash tests/cluster/up.sh creates it)"

# Every directory from / down to PATH must be traversable by the user; add o+x where it is not.
make_reachable() {
    local path=$1 dir="" part
    local IFS=/
    for part in $path; do
        [[ -n $part ]] || continue
        dir+=/$part
        [[ -d $dir ]] || break
        if ! as_user test -x "$dir"; then
            chmod o+x "$dir"
            log "made $dir traversable for $USER_NAME (chmod o+x: others may pass through, not list it)"
        fi
    done
}
make_reachable "$ROOT"
# The interpreter (a venv's python links to its base installation, e.g. under /root/.pyenv).
if [[ -e $1 ]]; then make_reachable "$(dirname "$(readlink -f "$1")")"; fi

# The checkout's files (tracked and untracked, not ignored: what the suite reads) and the virtual env must
# be readable by the user. Ignored folders (cache/, runs/) may hold other users' private files: not checked.
checkout_files() {
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$ROOT" ls-files -z --cached --others --exclude-standard
    else
        (cd "$ROOT" && find . -path ./.git -prune -o -path ./.venv -prune -o -type f -print0)
    fi
}
# (Files that exist, as root sees it; then which of them the user cannot read.)
unreadable=$(cd "$ROOT" && checkout_files | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _ |
    as_user xargs -0 -r sh -c 'for f; do [ -r "$f" ] || echo "$f"; done' _ 2>&1 | head -n 5) || true
venv=$(cd "$(dirname "$1")/.." 2>/dev/null && pwd) || venv=""
if [[ -z $unreadable && -n $venv && -f $venv/pyvenv.cfg ]]; then
    unreadable=$(as_user find -H "$venv" \( ! -readable -o -type d ! -executable \) -print 2>&1 | head -n 5) || true
fi
[[ -z $unreadable ]] || die "$USER_NAME cannot read these (and maybe more) in $ROOT:
$unreadable
  give others read access, e.g.: chmod -R o+rX <folder>   (make test runs the suite as $USER_NAME, not root)"
if [[ -e $1 ]]; then as_user test -x "$(readlink -f "$1")" || die "$USER_NAME cannot run $1"; fi

for d in "${WRITABLE[@]}"; do
    d=$ROOT/$d
    [[ -d $d ]] || install -d -m 755 "$d"
    as_user test -w "$d" -a -x "$d" && continue
    if command -v setfacl >/dev/null && setfacl -m "u:$USER_NAME:rwx" "$d" 2>/dev/null; then
        log "gave $USER_NAME write access to $d (setfacl -m u:$USER_NAME:rwx; the suite writes there)"
    else
        chown "$USER_NAME" "$d"
        log "made $USER_NAME the owner of $d (the suite writes there; no ACL support)"
    fi
done

# A small filesystem of the user's own for tests/test_disk_full.py (a full disk while a shard or checkpoint is
# written): a 64 MB tmpfs, mounted once and left mounted (it takes memory only while a test fills it).
SMALL_FS=${FTLIB_SMALL_FS:-/tmp/ftlib-small-fs}
if ! awk -v t="$SMALL_FS" '$2 == t && $3 == "tmpfs" { f = 1 } END { exit !f }' /proc/mounts; then
    mkdir -p "$SMALL_FS"
    if mount -t tmpfs -o "size=64m,mode=0700,uid=$(id -u "$USER_NAME"),gid=$(id -g "$USER_NAME")" tmpfs "$SMALL_FS"; then
        log "mounted a 64 MB tmpfs on $SMALL_FS for $USER_NAME (tests/test_disk_full.py)"
    else
        log "could not mount a tmpfs on $SMALL_FS: tests/test_disk_full.py will skip"
    fi
elif ! as_user test -w "$SMALL_FS" -a -x "$SMALL_FS"; then
    log "$SMALL_FS is a tmpfs $USER_NAME cannot write: tests/test_disk_full.py will skip"
fi

# The caller's environment, less what points into root's home (caches, pyenv shims) or is unusable.
ROOT_HOME=$(getent passwd root | cut -d: -f6)
[[ $ROOT_HOME != / ]] || ROOT_HOME=/nonexistent
drop=()
while IFS= read -r -d '' kv; do
    name=${kv%%=*} value=${kv#*=}
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    case $name in PATH | HOME | USER | LOGNAME | SHELL | MAIL | PWD | OLDPWD) continue ;; esac
    if [[ $value == "$ROOT_HOME" || $value == "$ROOT_HOME"/* || $value == *:"$ROOT_HOME"/* ]]; then
        drop+=(-u "$name")
    fi
done </proc/self/environ
if [[ -n ${TMPDIR:-} ]] && ! as_user test -w "$TMPDIR"; then drop+=(-u TMPDIR); fi
path=""
IFS=: read -ra parts <<<"${PATH:-/usr/local/bin:/usr/bin:/bin}"
for p in "${parts[@]}"; do
    [[ $p == "$ROOT_HOME" || $p == "$ROOT_HOME"/* ]] || path+=${path:+:}$p
done

log "running as $USER_NAME (HOME=$HOME_DIR): $*"
cd "$ROOT"
exec runuser -u "$USER_NAME" -- env "${drop[@]}" HOME="$HOME_DIR" USER="$USER_NAME" LOGNAME="$USER_NAME" \
    PATH="$path" PYTEST_ADDOPTS="${PYTEST_ADDOPTS:+$PYTEST_ADDOPTS }-o cache_dir=$HOME_DIR/.cache/ftlib-pytest" \
    "$@"
