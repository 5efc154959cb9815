# shellcheck shell=bash disable=SC2034
# Shared helpers for the testbed scripts (sourced, never run).
#
# Conventions:
#   - progress goes to stderr, machine-readable results to stdout;
#   - every process the testbed starts is recorded in $TB_DIR/pids/<name>.pid
#     (the pid) and $TB_DIR/pids/<name>.id (pid, boot id and start time, which
#     tell a reused pid apart), and logs to $TB_DIR/logs/<name>.log;
#   - every backend process has $TB_DIR somewhere in its command line, so that
#     `pgrep -f "$TB_DIR"` finds leftovers (the demo's operator does not: it is
#     found through its record only).

TB_K8S_VERSION=v1.36.3
TB_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TB_DIR=$(realpath -m -- "${BULKHEAD_TESTBED_DIR:-/tmp/bulkhead-testbed}")
TB_CACHE=${BULKHEAD_CACHE:-$HOME/.cache/bulkhead}
TB_PG_BIN=/usr/lib/postgresql/15/bin

# ---------------------------------------------------------------- logging

tb_log() { printf '[testbed] %s\n' "$*" >&2; }
tb_warn() { printf '[testbed] WARNING: %s\n' "$*" >&2; }
tb_die() {
	printf '[testbed] ERROR: %s\n' "$*" >&2
	exit 1
}

# Seconds since the epoch with microseconds (bash 5).
tb_now() { printf '%s' "${EPOCHREALTIME/,/.}"; }

# tb_elapsed START -> "1.23s"
tb_elapsed() {
	awk -v a="$1" -v b="$(tb_now)" 'BEGIN { printf "%.2fs", b - a }'
}

# tb_step DESCRIPTION COMMAND... : run a command, report how long it took.
tb_step() {
	local desc=$1 t0
	shift
	t0=$(tb_now)
	tb_log "--> ${desc}"
	"$@"
	tb_log "    ${desc}: done in $(tb_elapsed "$t0")"
}

# Print the last lines of a log file to stderr, indented.
tb_tail_log() {
	local file=$1 n=${2:-40}
	if [[ -f $file ]]; then
		printf '[testbed] ---- last %s lines of %s ----\n' "$n" "$file" >&2
		tail -n "$n" "$file" | sed 's/^/    /' >&2
		printf '[testbed] ---- end of %s ----\n' "$file" >&2
	fi
}

# --------------------------------------------------------------- secrets

# A random hex string (URL-safe, no quoting needed anywhere).
tb_secret() { openssl rand -hex "${1:-16}"; }

# --------------------------------------------------------------- ports

# tb_free_ports N [M]: print N free loopback TCP ports, then M ports P for
# which P+10000 is also free (SeaweedFS derives some gRPC ports that way).
# All printed ports are distinct. Space separated, one line.
tb_free_ports() {
	python3 - "$1" "${2:-0}" <<'PY'
import random
import socket
import sys

plain, paired = int(sys.argv[1]), int(sys.argv[2])
held = []
taken = set()


def grab(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    held.append(s)
    return s.getsockname()[1]


out = []
while len(out) < plain:
    p = grab(0)
    if p is not None and p not in taken:
        taken.add(p)
        out.append(p)
tries = 0
while len(out) < plain + paired:
    tries += 1
    if tries > 10000:
        sys.exit("no free port pairs found")
    p = random.randrange(20000, 30000)
    if p in taken or p + 10000 in taken:
        continue
    if grab(p) is None:
        continue
    if grab(p + 10000) is None:
        continue
    taken.update((p, p + 10000))
    out.append(p)
print(" ".join(map(str, out)))
for s in held:
    s.close()
PY
}

# tb_port_listening PORT: true if something listens on 127.0.0.1:PORT or any address.
tb_port_listening() {
	ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

# --------------------------------------------------------------- processes

tb_pidfile() { printf '%s/pids/%s.pid' "$TB_DIR" "$1"; }
tb_logfile() { printf '%s/logs/%s.log' "$TB_DIR" "$1"; }

# tb_pid NAME: print the recorded pid of a component (empty if none).
tb_pid() {
	local f
	f=$(tb_pidfile "$1")
	[[ -f $f ]] && tr -dc '0-9' <"$f"
	return 0
}

tb_idfile() { printf '%s/pids/%s.id' "$TB_DIR" "$1"; }

# tb_proc_id PID: what tells this process apart from a later one that gets the
# same pid: the boot id and its start time in clock ticks since boot (field 22
# of /proc/PID/stat). Fails if there is no such process.
tb_proc_id() {
	local stat boot
	local -a f
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) } # after "pid (comm) " the fields start at 3 (state)
	read -ra f <<<"$stat"
	[[ ${f[19]:-} =~ ^[0-9]+$ ]] || return 1
	boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown-boot)
	printf '%s %s\n' "$boot" "${f[19]}"
}

# tb_record NAME PID: record a process just started (identity first, so that a
# reader who sees the pid file also finds its identity).
tb_record() {
	local name=$1 pid=$2 id f
	id=$(tb_proc_id "$pid") || id="gone gone"
	f=$(tb_idfile "$name")
	printf '%s %s\n' "$pid" "$id" >"$f.tmp.$$"
	mv -f "$f.tmp.$$" "$f"
	f=$(tb_pidfile "$name")
	printf '%s\n' "$pid" >"$f.tmp.$$"
	mv -f "$f.tmp.$$" "$f"
}

# tb_forget NAME: remove a component's record.
tb_forget() { rm -f "$(tb_pidfile "$1")" "$(tb_idfile "$1")"; }

# tb_alive NAME: the recorded process runs and is the one that was recorded:
# its start time matches the identity file, so a reused pid does not count.
# A record without an identity (written by older scripts) falls back to the
# old test: the command line mentions the testbed directory.
tb_alive() {
	local pid idpid idrest
	pid=$(tb_pid "$1")
	[[ -n $pid ]] || return 1
	tb_running "$pid" || return 1
	if read -r idpid idrest 2>/dev/null <"$(tb_idfile "$1")" && [[ $idpid == "$pid" ]]; then
		[[ $(tb_proc_id "$pid") == "$idrest" ]]
		return
	fi
	[[ -r /proc/$pid/cmdline ]] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$TB_DIR/"
}

# tb_launch NAME COMMAND...: start COMMAND in its own session (so a Ctrl-C in
# the calling terminal does not reach it), in directory ${TB_LAUNCH_CWD:-$TB_DIR},
# stdout/stderr to the log, and record its pid. The pid is also the
# process-group id: job control is off, so the background child is not a group
# leader and setsid(1) calls setsid() without forking.
tb_launch() {
	local name=$1 log cwd=${TB_LAUNCH_CWD:-$TB_DIR}
	shift
	log=$(tb_logfile "$name")
	printf '\n===== %s starting %s =====\n' "$(date -u +%FT%TZ)" "$name" >>"$log"
	# fd 9 is the testbed lock: the daemon must not inherit it
	(cd "$cwd" && exec setsid "$@") >>"$log" 2>&1 </dev/null 9>&- &
	# the subshell's pid: it execs setsid, which execs the command, so the
	# pid and its start time stay those of the daemon
	tb_record "$name" "$!"
}

# tb_wait_until TIMEOUT_S NAME DESCRIPTION COMMAND...: poll COMMAND until it
# succeeds. Fails (with the log tail) if the process dies or time runs out.
tb_wait_until() {
	local timeout=$1 name=$2 desc=$3 t0 deadline
	shift 3
	t0=$(tb_now)
	deadline=$((SECONDS + timeout))
	while ! "$@" >/dev/null 2>&1; do
		if ! tb_alive "$name"; then
			tb_tail_log "$(tb_logfile "$name")"
			tb_die "${name} exited while waiting for ${desc} (log: $(tb_logfile "$name"))"
		fi
		if ((SECONDS >= deadline)); then
			tb_tail_log "$(tb_logfile "$name")"
			tb_die "${name}: ${desc} not reached within ${timeout}s (log: $(tb_logfile "$name"))"
		fi
		sleep 0.2
	done
	tb_log "    ${name}: ${desc} after $(tb_elapsed "$t0")"
}

# tb_ancestors: pids of this shell and all its ancestors, one per line.
tb_ancestors() {
	local p=$$ stat
	while [[ -n $p && $p != 0 ]]; do
		printf '%s\n' "$p"
		stat=$(cat "/proc/$p/stat" 2>/dev/null) || break
		stat=${stat##*) } # after "pid (comm) ": state ppid ...
		read -r _ p _ <<<"$stat"
	done
}

# tb_leftovers: pids of processes whose command line mentions $TB_DIR,
# excluding this script and its ancestors.
tb_leftovers() {
	local anc pid pattern
	anc=$(tb_ancestors)
	# pgrep takes an extended regular expression: escape the directory name.
	pattern=$(printf '%s/' "$TB_DIR" | sed 's/[][\.*^$+?(){}|]/\\&/g')
	for pid in $(pgrep -f -- "$pattern" || true); do
		grep -qx -- "$pid" <<<"$anc" && continue
		tb_running "$pid" || continue
		printf '%s\n' "$pid"
	done
}

# ------------------------------------------------------------ stopping

# PostgreSQL's "smart" shutdown (TERM) waits for clients; INT is "fast".
tb_stop_signal() { if [[ $1 == postgres ]]; then echo INT; else echo TERM; fi; }

# tb_running PID: the process exists and is not a zombie. (A daemon whose
# parent has exited stays a zombie until init reaps it, which may take a while.)
tb_running() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat:0:1} != Z ]]
}

# tb_group_alive PID: the process or any member of its process group runs.
tb_group_alive() {
	local p
	tb_running "$1" && return 0
	for p in $(pgrep -g "$1" 2>/dev/null || true); do
		tb_running "$p" && return 0
	done
	return 1
}

# tb_stop_batch QUIET NAME...: signal the named components together, wait up
# to TB_STOP_TIMEOUT seconds for them (and their process groups) to go, then
# SIGKILL what is left.
tb_stop_batch() {
	local quiet=$1 name pid sig deadline i any
	shift
	local -a pids=() names=()
	for name in "$@"; do
		pid=$(tb_pid "$name")
		if tb_alive "$name"; then
			sig=$(tb_stop_signal "$name")
			[[ -n $quiet ]] || tb_log "    stopping $name (pid $pid, SIG$sig)"
			kill -s "$sig" "$pid" 2>/dev/null || true
			pids+=("$pid")
			names+=("$name")
		fi
		tb_forget "$name"
	done
	deadline=$((SECONDS + ${TB_STOP_TIMEOUT:-30}))
	while :; do
		any=0
		for i in "${!pids[@]}"; do
			tb_group_alive "${pids[$i]}" && any=1
		done
		((any)) || break
		((SECONDS < deadline)) || break
		sleep 0.2
	done
	for i in "${!pids[@]}"; do
		if tb_group_alive "${pids[$i]}"; then
			tb_warn "${names[$i]} (pid ${pids[$i]}) did not stop in time: SIGKILL"
			kill -KILL -- "-${pids[$i]}" 2>/dev/null || true
			kill -KILL "${pids[$i]}" 2>/dev/null || true
		fi
	done
}

# tb_stop_all quiet|verbose: stop every recorded component, the demo's
# operator and the controller-manager first (clients of the apiserver), then kube-apiserver
# (it hangs on shutdown once etcd is gone), then the rest, then any leftover
# process whose command line mentions $TB_DIR/. Returns non-zero if something
# survived.
tb_stop_all() {
	local quiet='' f t0 deadline
	[[ $1 == quiet ]] && quiet=1
	t0=$(tb_now)
	local -a rest=()
	shopt -s nullglob
	for f in "$TB_DIR"/pids/*.pid; do
		f=$(basename "$f" .pid)
		[[ $f == operator || $f == kube-controller-manager || $f == kube-apiserver ]] || rest+=("$f")
	done
	shopt -u nullglob
	tb_stop_batch "$quiet" operator
	rm -f "$TB_DIR/operator.env"
	tb_stop_batch "$quiet" kube-controller-manager
	tb_stop_batch "$quiet" kube-apiserver
	tb_stop_batch "$quiet" "${rest[@]}"

	# Anything else still running from this directory (e.g. after pid files were lost).
	local -a left
	mapfile -t left < <(tb_leftovers)
	if ((${#left[@]})); then
		tb_warn "stopping leftover processes: $(ps -o pid=,args= -p "$(
			IFS=,
			echo "${left[*]}"
		)" | cut -c1-120 | tr '\n' ';')"
		kill -TERM "${left[@]}" 2>/dev/null || true
		deadline=$((SECONDS + 5))
		while ((SECONDS < deadline)) && [[ -n $(tb_leftovers) ]]; do sleep 0.2; done
		mapfile -t left < <(tb_leftovers)
		if ((${#left[@]})); then
			kill -KILL "${left[@]}" 2>/dev/null || true
		fi
		sleep 0.2
	fi
	tb_cleanup_sockets
	[[ -n $quiet ]] || tb_log "    stopped in $(tb_elapsed "$t0")"
	[[ -z $(tb_leftovers) ]]
}

# tb_stop_one NAME: stop a single component.
tb_stop_one() {
	local name=$1 pid sig deadline
	pid=$(tb_pid "$name")
	if tb_alive "$name"; then
		sig=$(tb_stop_signal "$name")
		kill -s "$sig" "$pid" 2>/dev/null || true
		deadline=$((SECONDS + ${TB_STOP_TIMEOUT:-30}))
		while tb_group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
		kill -KILL -- "-$pid" 2>/dev/null || true
		kill -KILL "$pid" 2>/dev/null || true
	fi
	tb_forget "$name"
}

# SeaweedFS puts its gRPC unix sockets in /tmp, named by port. A clean stop
# removes them; after a SIGKILL they stay behind.
tb_cleanup_sockets() {
	[[ -f $TB_DIR/state.env ]] || return 0
	local port
	while read -r port; do
		rm -f /tmp/seaweedfs-*-grpc-"$port".sock
	done < <(sed -n 's/^WEED_.*GRPC_PORT=\([0-9]*\)$/\1/p; s/^S3_GRPC_PORT=\([0-9]*\)$/\1/p' "$TB_DIR/state.env")
}

# tb_state_ports: every TCP port recorded in the state file.
tb_state_ports() {
	[[ -f $TB_DIR/state.env ]] || return 0
	sed -n 's/^[A-Z0-9_]*_PORT=\([0-9][0-9]*\)$/\1/p' "$TB_DIR/state.env"
}

# ----------------------------------------------------------- installing

# tb_apt_install PACKAGE...: install Debian packages (root only), logging to
# $TB_DIR/logs/install.log; `apt-get update` once per run.
tb_apt_install() {
	local log=$TB_DIR/logs/install.log policy=/usr/sbin/policy-rc.d made_policy=0
	((EUID == 0)) || tb_die "missing Debian packages: $* (run as root, or install them)"
	mkdir -p "$TB_DIR/logs"
	if [[ ! -e $policy ]]; then
		# keep package scripts from starting system-wide redis/postgres services
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod 755 "$policy"
		made_policy=1
	fi
	local rc=0
	{
		if [[ -z ${APT_UPDATED:-} ]]; then
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && APT_UPDATED=1
		fi &&
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
	} >>"$log" 2>&1 || rc=$?
	((made_policy)) && rm -f "$policy"
	if ((rc != 0)); then
		tb_tail_log "$log" 30
		tb_die "apt-get install $* failed (log: $log)"
	fi
}

# ------------------------------------------------------------- locking

# tb_lock: take the testbed lock on fd 9 (waiting for a running up/down).
# `down` may delete the directory (and the lock file) while we wait: retry
# until the lock we hold is the current file.
tb_lock() {
	while :; do
		mkdir -p "$TB_DIR"
		exec 9>>"$TB_DIR/.lock"
		flock -w 900 9 || tb_die "timed out waiting for another testbed run (lock $TB_DIR/.lock)"
		[[ $TB_DIR/.lock -ef /proc/self/fd/9 ]] && return 0
		exec 9>&-
	done
}

# ------------------------------------------------------------- operator

# tb_listen_addr PID: the first TCP address PID listens on (e.g. 127.0.0.1:41234).
tb_listen_addr() {
	ss -Hltnp 2>/dev/null | awk -v p="pid=$1," 'index($0, p) { print $4; found = 1; exit } END { exit !found }'
}

# tb_sync_operator_env: the env file exports the operator's variables
# ($TB_DIR/operator.env: BULKHEAD_OPERATOR_*) exactly while it runs.
tb_sync_operator_env() {
	local env=$TB_DIR/env extra=$TB_DIR/operator.env tmp
	[[ -f $env ]] || return 0
	tmp=$env.operator.$$
	{
		grep -v '^export BULKHEAD_OPERATOR_' "$env" || true
		if [[ -f $extra ]] && tb_alive operator; then cat "$extra"; fi
	} >"$tmp"
	chmod 600 "$tmp"
	mv -f "$tmp" "$env"
}
