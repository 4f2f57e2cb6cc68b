# Shared by start-cluster.sh and stop-cluster.sh (sourced, not run).

running() {  # running PID [NAME] -> 0 if PID is a live process (named NAME)
    local stat
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
    # not a zombie (PID 1 of a container may be slow to reap), not a reused pid
    stat=$(ps -o stat=,comm= -p "$1" 2>/dev/null) || return 1
    case "$stat" in Z* | "") return 1 ;; esac
    [ -z "${2:-}" ] || [[ "$stat" == *"$2"* ]]
}

alive() {  # alive PIDFILE NAME -> 0 if process NAME with the pid in PIDFILE runs
    [ -s "$1" ] && running "$(cat "$1" 2>/dev/null)" "${2:-}"
}
