# shellcheck shell=bash disable=SC2034
# The opt-in node (BULKHEAD_TESTBED_NODE=1): containerd + runc, kubelet, kube-scheduler
# and kube-router (NetworkPolicy enforcement only), so that pods exchange real packets.
# Sourced by testbed/up, testbed/down, testbed/node and testbed/check after common.sh.
#
# The node uses names that exist once per machine (the bridge, the address on lo, the
# iptables chains, ipsets and kubepods cgroups, the Node name): only one testbed dir may
# run it. /run/bulkhead-testbed-node names that dir while its node exists.
#
# Callers set K8S_BIN (kubectl), NODE_BIN (build-node's bin dir) and, for node_up,
# NODE_IMAGES (build-netprobe's archive), and load the state file (ports).

NODE_NAME=bulkhead-node
NODE_IP=10.244.255.1
NODE_POD_CIDR=10.244.0.0/24
NODE_BRIDGE=bhcni0
NODE_CNI_NETWORK=bulkhead
NODE_IMAGE=bulkhead.local/netprobe:1
NODE_PAUSE_IMAGE=bulkhead.local/pause:1
NODE_DIR=$TB_DIR/node
NODE_CLAIM=/run/bulkhead-testbed-node
NODE_COMPONENTS=(kube-router kube-scheduler kubelet containerd)
NODE_KERNEL_OPTIONS=(IP_SET NETFILTER_XT_SET BRIDGE_NETFILTER VETH BRIDGE OVERLAY_FS)
# set by us (the first two) or by the kubelet (protectKernelDefaults=false: it
# "fixes" them); saved before the node starts, restored when it is torn down
NODE_SYSCTLS=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables
	vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
	kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# kube-router's own iptables chains and ipsets (v2.6.2, NetworkPolicy controller)
NODE_ENFORCER_CHAINS='^KUBE-(ROUTER-|NWPLCY-|POD-FW-)'
NODE_ENFORCER_RULES='KUBE-(ROUTER|NWPLCY-|POD-FW-)'
NODE_ENFORCER_IPSETS='^(inet6:)?(KUBE-SRC-|KUBE-DST-|kube-router-|TMP-[A-Z2-7]{16}$)'

node_enabled() { [[ ${BULKHEAD_TESTBED_NODE:-0} == 1 || -f $NODE_DIR/enabled ]]; }
# anything of a node to tear down: its directory, or the machine-wide claim naming us
node_present() { [[ -d $NODE_DIR ]] || [[ $(cat "$NODE_CLAIM" 2>/dev/null) == "$TB_DIR" ]]; }

node_sock() { printf '%s/containerd/containerd.sock' "$NODE_DIR"; }
ctr_() { "$NODE_BIN/ctr" --address "$(node_sock)" --namespace k8s.io "$@"; }
node_kubectl() { "$K8S_BIN/kubectl" --kubeconfig "$TB_DIR/kubeconfig" --request-timeout=10s "$@"; }
node_log() { tb_log "    node: $*"; }

# node_pids_under DIR: pids of processes whose command line mentions DIR/.
node_pids_under() {
	local pattern pid
	pattern=$(printf '%s/' "$1" | sed 's/[][\.*^$+?(){}|]/\\&/g')
	for pid in $(pgrep -f -- "$pattern" || true); do
		tb_running "$pid" && printf '%s\n' "$pid"
	done
	return 0
}

# ================================================================ preflight

# node_check_host: root, and a kernel with everything the node needs.
node_check_host() {
	((EUID == 0)) || tb_die "the node (BULKHEAD_TESTBED_NODE=1) needs root: it adds an address to lo, a bridge, iptables rules, ipsets and cgroups"
	local config='' opt missing=() text
	if [[ -r /proc/config.gz ]]; then
		config=/proc/config.gz
		text=$(zcat /proc/config.gz)
	elif [[ -r /boot/config-$(uname -r) ]]; then
		config=/boot/config-$(uname -r)
		text=$(cat "$config")
	fi
	if [[ -z $config ]]; then
		tb_warn "cannot read the kernel configuration (/proc/config.gz, /boot/config-$(uname -r)): not checking ${NODE_KERNEL_OPTIONS[*]}"
	else
		for opt in "${NODE_KERNEL_OPTIONS[@]}"; do
			grep -qE "^CONFIG_${opt}=[ym]$" <<<"$text" || missing+=("CONFIG_$opt")
		done
		((${#missing[@]} == 0)) ||
			tb_die "the kernel ($(uname -r)) lacks ${missing[*]} (from $config): the node needs ipsets and the xt_set match (kube-router), bridge netfilter, veth and bridge (CNI), overlayfs (containerd)"
	fi
	# unix socket paths are limited to 108 bytes
	local sock
	sock=$(node_sock).ttrpc
	((${#sock} < 100)) || tb_die "BULKHEAD_TESTBED_DIR is too long for the node's sockets ($sock)"
}

# node_kubelets: pids of running kubelets (pgrep also lists zombies, and a stopped
# daemon stays one until init reaps it).
node_kubelets() {
	local pid
	for pid in $(pgrep -x kubelet || true); do
		tb_running "$pid" && printf '%s\n' "$pid"
	done
	return 0
}

# node_machine_traces: what a node leaves on the machine, one per line (empty: none).
node_machine_traces() {
	ip link show "$NODE_BRIDGE" >/dev/null 2>&1 && echo "bridge $NODE_BRIDGE"
	ip -4 -o addr show dev lo 2>/dev/null | grep -qF " $NODE_IP/" && echo "address $NODE_IP on lo"
	local pid
	for pid in $(node_kubelets); do
		echo "kubelet (pid $pid): $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-100)"
	done
	return 0
}

# node_claim: make this testbed dir the machine's only node owner, or refuse.
node_claim() {
	(
		flock -w 60 8 || tb_die "timed out waiting for $NODE_CLAIM.lock"
		local owner traces pids
		owner=$(cat "$NODE_CLAIM" 2>/dev/null || true)
		if [[ $owner == "$TB_DIR" ]]; then
			exit 0
		fi
		traces=$(node_machine_traces | grep -vF -- "$TB_DIR/" || true)
		[[ -z $owner ]] || traces=$(grep -vF -- "$owner/" <<<"$traces" || true)
		if [[ -n $owner ]]; then
			pids=$(node_pids_under "$owner/node" | paste -sd ' ')
			if [[ -n $pids || -n $traces ]]; then
				tb_die "the testbed in $owner runs a node on this machine (${pids:+pids $pids; }${traces//$'\n'/; }); only one node may exist per machine: stop it first with BULKHEAD_TESTBED_DIR=$owner testbed/down"
			fi
			tb_warn "the node claim of $owner is stale (nothing of its node is left): taking it over"
		elif [[ -n $traces ]]; then
			tb_die "this machine already has a node that no testbed claims (${traces//$'\n'/; }); only one node may exist per machine: remove it first"
		fi
		printf '%s\n' "$TB_DIR" >"$NODE_CLAIM.tmp.$$"
		mv -f "$NODE_CLAIM.tmp.$$" "$NODE_CLAIM"
	) 8>>"$NODE_CLAIM.lock"
}

node_release_claim() {
	(
		flock -w 60 8 || exit 0
		[[ $(cat "$NODE_CLAIM" 2>/dev/null) == "$TB_DIR" ]] && rm -f "$NODE_CLAIM"
		exit 0
	) 8>>"$NODE_CLAIM.lock"
	rm -f "$NODE_CLAIM.lock"
}

# ==================================================================== config

node_write_configs() {
	local n=$NODE_DIR
	mkdir -p "$n/containerd" "$n/cni" "$n/kubelet/pki" "$n/pod-logs" "$n/volume-plugins" "$n/scheduler-certs"
	chmod 700 "$n/containerd" "$n/scheduler-certs"
	cat >"$n/containerd.toml" <<EOF
version = 3
root = "$n/containerd/root"
state = "$n/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing", "io.containerd.nri.v1.nri"]
[grpc]
  address = "$n/containerd/containerd.sock"
[ttrpc]
  address = "$n/containerd/containerd.sock.ttrpc"
[debug]
  address = "$n/containerd/debug.sock"
[metrics]
  address = ""
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$NODE_PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  # no CAP_SYS_RESOURCE in the bounding set here: nothing may lower oom_score_adj
  # (runc init fails with "failed to update /proc/self/oom_score_adj: Permission denied")
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$n/cni"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "$NODE_BIN/runc"
      Root = "$n/runc"
      SystemdCgroup = false
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF
	cat >"$n/cni/10-bulkhead.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "$NODE_CNI_NETWORK", "plugins": [
 {"type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "$NODE_POD_CIDR"}]], "dataDir": "$n/ipam"}},
 {"type": "loopback"}]}
EOF
	cat >"$n/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# this host has cgroup v1 controllers; kubelet 1.35+ refuses to start on v1 without this
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$n/containerd/containerd.sock
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $TB_DIR/k8s/pki/ca.crt}
authorization: {mode: AlwaysAllow}
failSwapOn: false
resolvConf: ""
enforceNodeAllocatable: []
evictionHard: {}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
localStorageCapacityIsolation: false
# keep the kubelet's files in the testbed dir (defaults: /var/log/pods, /usr/libexec/kubernetes/...)
podLogsDir: $n/pod-logs
volumePluginDir: $n/volume-plugins
EOF
}

# ================================================================= machine

node_save_sysctls() {
	local f=$NODE_DIR/sysctl.saved s v
	[[ -f $f ]] && return 0 # saved before an earlier start: those are the machine's own
	for s in "${NODE_SYSCTLS[@]}"; do
		v=$(sysctl -n "$s" 2>/dev/null) && printf '%s=%s\n' "$s" "$v"
	done >"$f.tmp"
	mv -f "$f.tmp" "$f"
}

node_restore_sysctls() {
	local f=$NODE_DIR/sysctl.saved line
	[[ -f $f ]] || return 0
	while IFS= read -r line; do
		if [[ -n $line ]]; then sysctl -qw "$line" >/dev/null 2>&1 || true; fi
	done <"$f"
	rm -f "$f"
	node_log "restored ${NODE_SYSCTLS[*]}"
}

node_setup_host() {
	node_save_sysctls
	sysctl -qw net.ipv4.ip_forward=1 >/dev/null
	[[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] ||
		tb_die "net.bridge.bridge-nf-call-iptables does not exist (bridge netfilter is not loaded)"
	sysctl -qw net.bridge.bridge-nf-call-iptables=1 >/dev/null
	# the kubelet refuses a loopback node IP and needs it on an interface; there is
	# no dummy link driver here, so the address goes on lo
	ip -4 -o addr show dev lo | grep -qF " $NODE_IP/" || ip addr add "$NODE_IP/32" dev lo
}

# =================================================================== health

healthy_containerd() { [[ -S $(node_sock) ]] && ctr_ version >/dev/null 2>&1; }
healthy_kubelet() { [[ $(curl -fsS --max-time 3 "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz" 2>/dev/null) == ok ]]; }
healthy_scheduler() { [[ $(curl -ksS --max-time 3 "https://127.0.0.1:$SCHEDULER_PORT/healthz" 2>/dev/null) == ok ]]; }
node_registered() { node_kubectl get node "$NODE_NAME" -o name >/dev/null 2>&1; }
# Ready with its pod CIDR, as posted by the running kubelet: no node-lifecycle
# controller marks a stopped kubelet's Node NotReady, so the Ready condition must be
# newer than NODE_KUBELET_SINCE (UTC, set when the kubelet is started).
node_ready() {
	local cidr ready beat
	read -r cidr ready beat < <(node_kubectl get node "$NODE_NAME" \
		-o 'jsonpath={.spec.podCIDR} {.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}{"\n"}' 2>/dev/null) ||
		return 1
	[[ $cidr == "$NODE_POD_CIDR" && $ready == True && ! $beat < ${NODE_KUBELET_SINCE:-} ]]
}
# kube-router's metrics answer (127.0.0.1), its top-level chains exist and it has
# finished a full sync of the policies.
enforcer_synced() {
	local syncs
	syncs=$(curl -fsS --max-time 3 "http://127.0.0.1:$KUBE_ROUTER_METRICS_PORT/metrics" 2>/dev/null |
		awk '$1 == "kube_router_controller_iptables_sync_time_count" { print $2 }')
	[[ -n $syncs && $syncs != 0 ]] || return 1
	local c
	for c in KUBE-ROUTER-INPUT KUBE-ROUTER-FORWARD KUBE-ROUTER-OUTPUT; do
		iptables -w 5 -S "$c" >/dev/null 2>&1 || return 1
	done
}

# node_all_healthy: every node process alive and answering (testbed/up's fast path).
node_all_healthy() {
	local c
	for c in "${NODE_COMPONENTS[@]}"; do tb_alive "$c" || return 1; done
	[[ -n ${KUBELET_HEALTHZ_PORT:-} && -n ${KUBE_ROUTER_METRICS_PORT:-} ]] &&
		healthy_kubelet && healthy_enforcer_port || return 1
	# Ready, with its pod CIDR, and no taint
	[[ $(node_kubectl get node "$NODE_NAME" -o 'jsonpath={.spec.podCIDR} {.status.conditions[?(@.type=="Ready")].status} {.spec.taints}' 2>/dev/null) == "$NODE_POD_CIDR True " ]]
}
healthy_enforcer_port() { curl -fsS -o /dev/null --max-time 3 "http://127.0.0.1:$KUBE_ROUTER_METRICS_PORT/metrics"; }

# ================================================================= launching

launch_containerd() {
	# containerd finds containerd-shim-runc-v2 on PATH
	tb_launch containerd env PATH="$NODE_BIN:$PATH" "$NODE_BIN/containerd" --config "$NODE_DIR/containerd.toml"
}

NODE_KUBELET_SINCE=
launch_kubelet() {
	NODE_KUBELET_SINCE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
	tb_launch kubelet "$NODE_BIN/kubelet" \
		--config="$NODE_DIR/kubelet.yaml" \
		--kubeconfig="$TB_DIR/kubeconfig" \
		--root-dir="$NODE_DIR/kubelet" \
		--cert-dir="$NODE_DIR/kubelet/pki" \
		--hostname-override="$NODE_NAME" \
		--node-ip="$NODE_IP"
}

launch_scheduler() {
	local kc=$TB_DIR/kubeconfig
	tb_launch kube-scheduler "$NODE_BIN/kube-scheduler" \
		--kubeconfig="$kc" \
		--authentication-kubeconfig="$kc" \
		--authentication-skip-lookup \
		--authorization-kubeconfig="$kc" \
		--bind-address=127.0.0.1 \
		--secure-port="$SCHEDULER_PORT" \
		--cert-dir="$NODE_DIR/scheduler-certs" \
		--leader-elect=false \
		--profiling=false
}

# Its health port would listen on every address (no flag sets its address): off. Its
# metrics port binds 127.0.0.1 and tells when the first full sync is done.
launch_enforcer() {
	tb_launch kube-router "$NODE_BIN/kube-router" \
		--kubeconfig="$TB_DIR/kubeconfig" \
		--hostname-override="$NODE_NAME" \
		--run-firewall=true \
		--run-router=false \
		--run-service-proxy=false \
		--run-loadbalancer=false \
		--enable-cni=false \
		--health-port=0 \
		--metrics-addr=127.0.0.1 \
		--metrics-port="$KUBE_ROUTER_METRICS_PORT" \
		-v=1
}

node_launch_if_dead() { # name launcher
	if tb_alive "$1"; then
		node_log "$1 already running (pid $(tb_pid "$1"))"
	else
		"$2"
		node_log "$1 started (pid $(tb_pid "$1"))"
	fi
}

# shellcheck disable=SC2153 # NODE_IMAGES: set by the caller
# node_import_images: load build-netprobe's archive into containerd (k8s.io namespace)
# unless this very archive was imported and both images are there.
node_import_images() {
	local sum have
	sum=$(sha256sum <"$NODE_IMAGES" | cut -c1-64)
	have=$(ctr_ images ls -q 2>/dev/null || true)
	if [[ $(cat "$NODE_DIR/images.imported" 2>/dev/null) == "$sum" ]] &&
		grep -qxF "$NODE_IMAGE" <<<"$have" && grep -qxF "$NODE_PAUSE_IMAGE" <<<"$have"; then
		return 0
	fi
	local t0 log
	t0=$(tb_now)
	log=$(tb_logfile node-images)
	ctr_ images import "$NODE_IMAGES" >>"$log" 2>&1 ||
		{
			tb_tail_log "$log"
			tb_die "ctr images import $NODE_IMAGES failed (log: $log)"
		}
	printf '%s\n' "$sum" >"$NODE_DIR/images.imported"
	node_log "imported $NODE_PAUSE_IMAGE, $NODE_IMAGE in $(tb_elapsed "$t0")"
}

# The Node's pod CIDR: no node-ipam controller runs, so it is set here (kube-router
# reads it). It cannot change once set.
node_set_pod_cidr() {
	local cidr
	cidr=$(node_kubectl get node "$NODE_NAME" -o 'jsonpath={.spec.podCIDR}')
	[[ $cidr == "$NODE_POD_CIDR" ]] && return 0
	[[ -z $cidr ]] ||
		tb_die "Node $NODE_NAME has podCIDR $cidr, not $NODE_POD_CIDR (kubectl delete node $NODE_NAME, then testbed/up)"
	node_kubectl patch node "$NODE_NAME" --type=merge \
		-p "{\"spec\":{\"podCIDR\":\"$NODE_POD_CIDR\",\"podCIDRs\":[\"$NODE_POD_CIDR\"]}}" >/dev/null
}

# The API server's TaintNodesByCondition admission gives a new Node the taint
# node.kubernetes.io/not-ready:NoSchedule; the node-lifecycle controller, which would
# lift it once the Node is Ready, does not run here: lift it here.
node_untaint() {
	local taints
	taints=$(node_kubectl get node "$NODE_NAME" -o 'jsonpath={.spec.taints[*].key}')
	[[ " $taints " == *" node.kubernetes.io/not-ready "* ]] || return 0
	node_kubectl taint node "$NODE_NAME" node.kubernetes.io/not-ready:NoSchedule- >/dev/null
	node_log "lifted the taint node.kubernetes.io/not-ready:NoSchedule"
}

# node_up: start whatever of the node is not running; wait until the Node is Ready,
# has its pod CIDR, the scheduler answers and the enforcer has synced.
node_up() {
	mkdir -p "$NODE_DIR"
	touch "$NODE_DIR/enabled"
	printf '%s\n' "$NODE_BIN" >"$NODE_DIR/bin-dir"
	node_write_configs
	node_setup_host
	node_launch_if_dead containerd launch_containerd
	node_launch_if_dead kube-scheduler launch_scheduler
	tb_wait_until "$START_TIMEOUT" containerd "containerd answering" healthy_containerd
	node_import_images
	node_launch_if_dead kubelet launch_kubelet
	tb_wait_until "$START_TIMEOUT" kubelet "Node $NODE_NAME registered" node_registered
	node_set_pod_cidr
	node_launch_if_dead kube-router launch_enforcer
	tb_wait_until "$START_TIMEOUT" kubelet "Node $NODE_NAME Ready, podCIDR $NODE_POD_CIDR" node_ready
	node_untaint
	tb_wait_until "$START_TIMEOUT" kube-scheduler "/healthz ok" healthy_scheduler
	tb_wait_until "$START_TIMEOUT" kube-router "enforcer synced (chains, first full sync)" enforcer_synced
}

# ================================================================== cleanup

# node_iptables_purge CHAIN_RE RULE_RE: in every table of iptables and ip6tables,
# delete the rules of other chains that match RULE_RE, then flush and delete the
# chains whose names match CHAIN_RE; one iptables-restore --noflush per family,
# nothing else touched. Prints "RULES CHAINS" removed.
node_iptables_purge() {
	local fam script total_r=0 total_c=0 r c
	for fam in iptables ip6tables; do
		command -v "$fam-save" >/dev/null || continue
		script=$("$fam-save" 2>/dev/null | awk -v chains="$1" -v rules="$2" '
			/^\*/ { table = $0; nd = 0; nc = 0; next }
			/^:/ { c = substr($1, 2); if (c ~ chains) ch[++nc] = c; next }
			/^-A / { if ($2 !~ chains && $0 ~ rules) del[++nd] = "-D" substr($0, 3); next }
			/^COMMIT/ {
				if (nd + nc == 0) next
				print table
				for (i = 1; i <= nd; i++) print del[i]
				for (i = 1; i <= nc; i++) print "-F " ch[i]
				for (i = 1; i <= nc; i++) print "-X " ch[i]
				print "COMMIT"
			}') || true
		[[ -n $script ]] || continue
		r=$(grep -c '^-D ' <<<"$script" || true)
		c=$(grep -c '^-X ' <<<"$script" || true)
		if "$fam-restore" -w 5 --noflush <<<"$script" 2>/dev/null || "$fam-restore" --noflush <<<"$script"; then
			total_r=$((total_r + r))
			total_c=$((total_c + c))
		else
			tb_warn "$fam-restore failed to remove ${c} chains, ${r} rules"
		fi
	done
	printf '%s %s\n' "$total_r" "$total_c"
}

# node_ipsets_destroy: destroy kube-router's ipsets (they may still be referenced for
# a moment after the rules went). Prints how many.
node_ipsets_destroy() {
	local n=0 name try left
	command -v ipset >/dev/null || {
		echo 0
		return 0
	}
	for try in 1 2 3 4 5 6; do
		left=0
		for name in $(ipset list -n 2>/dev/null | grep -E -- "$NODE_ENFORCER_IPSETS" || true); do
			if ipset destroy "$name" 2>/dev/null; then n=$((n + 1)); else left=1; fi
		done
		((left)) || break
		sleep 0.5
	done
	echo "$n"
}

# node_enforcer_cleanup: what kube-router --cleanup-config does for its NetworkPolicy
# controller, limited to kube-router's own chains, rules and ipsets (--cleanup-config
# also flushes every IPVS service and destroys every ipset of the machine, and leaves
# its 3 "explicitly ACCEPT" mark rules behind). Prints a summary.
node_enforcer_cleanup() {
	local rc sets
	rc=$(node_iptables_purge "$NODE_ENFORCER_CHAINS" "$NODE_ENFORCER_RULES")
	sets=$(node_ipsets_destroy)
	printf 'removed %s rules, %s chains, %s ipsets' "${rc% *}" "${rc#* }" "$sets"
}

# node_netns_paths: the network namespaces of our pods: from containerd (every
# container's spec) and from the CNI result cache of our network.
node_netns_paths() {
	local id f
	{
		if [[ -x ${NODE_BIN:-}/ctr ]] && healthy_containerd; then
			for id in $(ctr_ containers ls -q 2>/dev/null || true); do
				ctr_ containers info "$id" 2>/dev/null | python3 -c '
import json, sys
try:
    spec = json.load(sys.stdin).get("Spec") or {}
except ValueError:
    sys.exit(0)
for ns in (spec.get("linux") or {}).get("namespaces") or []:
    if ns.get("type") == "network" and ns.get("path"):
        print(ns["path"])' || true
			done
		fi
		for f in /var/lib/cni/results/"$NODE_CNI_NETWORK"-*; do
			[[ -f $f ]] && python3 -c '
import json, sys
try:
    print(json.load(open(sys.argv[1])).get("netns") or "")
except ValueError:
    pass' "$f"
		done
	} | grep -E '^/(var/)?run/netns/' | sort -u || true
}

# node_shim_sockets: the sockets our shims listen on (or left behind), in containerd's
# fixed /run/containerd/s: named by sha256(containerd's address/namespace/task id).
node_shim_sockets() {
	local d=$NODE_DIR/containerd/state/io.containerd.runtime.v2.task/k8s.io id h
	for id in "$d"/*; do
		[[ -d $id ]] || continue
		id=${id##*/}
		for h in "$id" "$id/debug"; do
			h=$(printf '%s' "$(node_sock)/k8s.io/$h" | sha256sum | cut -c1-64)
			[[ -S /run/containerd/s/$h ]] && printf '/run/containerd/s/%s\n' "$h"
		done
	done
	return 0
}

node_mounts() {
	awk -v d="$NODE_DIR" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

node_kubepods_cgroups() {
	local d
	for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
		[[ -d $d ]] && printf '%s\n' "$d"
	done
	return 0
}

# node_leftovers: what of the node is still on the machine, one per line.
node_leftovers() {
	local pids n
	pids=$(node_pids_under "$NODE_DIR" | tr '\n' ' ')
	[[ -n $pids ]] && echo "processes: $pids"
	n=$(node_mounts | wc -l)
	((n == 0)) || echo "$n mounts under $NODE_DIR"
	ip link show "$NODE_BRIDGE" >/dev/null 2>&1 && echo "bridge $NODE_BRIDGE"
	ip -4 -o addr show dev lo 2>/dev/null | grep -qF " $NODE_IP/" && echo "address $NODE_IP on lo"
	n=$( (iptables-save 2>/dev/null || true) | grep -c KUBE || true)
	((n == 0)) || echo "$n iptables lines with KUBE"
	n=$( (ip6tables-save 2>/dev/null || true) | grep -c KUBE || true)
	((n == 0)) || echo "$n ip6tables lines with KUBE"
	n=$( (ipset list -n 2>/dev/null || true) | grep -cE -- "$NODE_ENFORCER_IPSETS" || true)
	((n == 0)) || echo "$n kube-router ipsets"
	[[ -z $(node_kubepods_cgroups) ]] || echo "kubepods cgroups: $(node_kubepods_cgroups | tr '\n' ' ')"
	return 0
}

# node_teardown: stop the node and remove everything it put on the machine (the
# order below left this machine clean). Keeps $NODE_DIR (images, kubelet state) for
# `testbed/down --keep`; `testbed/up` starts the node again from it.
node_teardown() {
	local t0 pid p id out owner machine=1
	t0=$(tb_now)
	[[ -n ${NODE_BIN:-} ]] || NODE_BIN=$(cat "$NODE_DIR/bin-dir" 2>/dev/null || true)
	# The machine-wide names (bridge, lo address, iptables, ipsets, cgroups) are ours
	# to remove only if this dir claims the node, or nobody does and no other kubelet runs.
	owner=$(cat "$NODE_CLAIM" 2>/dev/null || true)
	if [[ -n $owner && $owner != "$TB_DIR" ]] ||
		{ [[ -z $owner ]] && node_machine_traces | grep '^kubelet ' | grep -qvF -- "$NODE_DIR/"; }; then
		machine=0
		tb_warn "the node on this machine belongs to ${owner:-no testbed}: stopping this dir's node processes only"
	fi

	# 1. the enforcer, and its rules (so that nothing filters while the rest goes)
	tb_stop_batch '' kube-router kube-scheduler
	if ((machine)); then
		out=$(node_enforcer_cleanup)
		node_log "enforcer: $out"
	fi
	# 2. the kubelet (it would restart the containers)
	tb_stop_batch '' kubelet
	# 3. every container; then containerd
	local -a netns shim_socks
	mapfile -t netns < <(node_netns_paths)
	mapfile -t shim_socks < <(node_shim_sockets)
	if [[ -x ${NODE_BIN:-}/ctr ]] && healthy_containerd; then
		local n=0
		for id in $(ctr_ tasks ls -q 2>/dev/null || true); do
			ctr_ tasks delete --force "$id" >/dev/null 2>&1 || ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
		done
		for id in $(ctr_ containers ls -q 2>/dev/null || true); do
			ctr_ tasks delete --force "$id" >/dev/null 2>&1 || true
			ctr_ containers delete "$id" >/dev/null 2>&1 && n=$((n + 1))
		done
		node_log "deleted $n containers"
	fi
	tb_stop_batch '' containerd
	# shims (their command line names our socket) and anything left in kubepods
	for pid in $(node_pids_under "$NODE_DIR"); do kill -KILL "$pid" 2>/dev/null || true; done
	local procs
	while IFS= read -r p; do
		procs=$(find "$p" -name cgroup.procs -exec cat {} + 2>/dev/null || true)
		# shellcheck disable=SC2086 # one pid per word
		if [[ -n $procs ]]; then kill -KILL $procs 2>/dev/null || true; fi
	done < <( ((machine)) && node_kubepods_cgroups)
	# their sockets (a killed shim leaves its socket behind)
	for p in "${shim_socks[@]}"; do rm -f -- "$p"; done
	# 4. mounts under the node dir, deepest first (overlay rootfs, shm, the kubelet's own)
	local try m
	for try in 1 2 3; do
		for m in $(node_mounts); do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
		[[ -z $(node_mounts) ]] && break
		sleep 0.5
	done
	# 5. pod network namespaces, the bridge and its leftover veths, the node address
	local gone=0
	for p in "${netns[@]}"; do
		[[ -e $p ]] || continue # an exited pod's, removed by containerd
		umount "$p" 2>/dev/null || umount -l "$p" 2>/dev/null || true
		rm -f -- "$p" && gone=$((gone + 1))
	done
	((gone == 0)) || node_log "removed $gone pod network namespaces"
	# the CNI state of our pods (containerd's go-cni caches a result per network: ours,
	# and its "cni-loopback"), their addresses included
	for p in /var/lib/cni/results/"$NODE_CNI_NETWORK"-*; do
		[[ -e $p ]] || continue
		id=${p#/var/lib/cni/results/"$NODE_CNI_NETWORK"-}
		rm -f -- "$p" "/var/lib/cni/results/cni-loopback-${id%-*}-lo"
	done
	rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null || true
	rm -rf -- "$NODE_DIR/ipam"
	if ((!machine)); then
		for p in "${NODE_COMPONENTS[@]}"; do tb_forget "$p"; done
		node_log "stopped in $(tb_elapsed "$t0")"
		return 0
	fi
	if ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
		for p in $(ip -o link show master "$NODE_BRIDGE" 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }'); do
			ip link del "$p" 2>/dev/null || true
		done
		ip link del "$NODE_BRIDGE" && node_log "removed bridge $NODE_BRIDGE"
	fi
	if ip -4 -o addr show dev lo | grep -qF " $NODE_IP/"; then
		ip addr del "$NODE_IP/32" dev lo && node_log "removed $NODE_IP from lo"
	fi
	# 6. the kubelet's chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT in
	# filter, nat, mangle) and whatever else is left; kube-router's ipsets
	out=$(node_iptables_purge '^KUBE-' 'KUBE-')
	[[ $out == "0 0" ]] || node_log "iptables: removed ${out% *} rules, ${out#* } chains"
	out=$(node_ipsets_destroy)
	[[ $out == 0 ]] || node_log "destroyed $out ipsets"
	# 7. the kubepods cgroups
	while IFS= read -r p; do
		find "$p" -depth -type d -exec rmdir {} + 2>/dev/null || true
	done < <(node_kubepods_cgroups)
	# 8. files outside the node dir: the kubelet's log links and device-plugin
	# socket, containerd's shim socket dir
	if [[ -d /var/log/containers ]]; then
		find /var/log/containers -maxdepth 1 -type l -lname "$NODE_DIR/*" -delete 2>/dev/null || true
		rmdir /var/log/containers 2>/dev/null || true
	fi
	if [[ -z $(node_kubelets) ]]; then
		rm -f /var/lib/kubelet/device-plugins/kubelet.sock
		rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet 2>/dev/null || true
	fi
	rmdir /run/containerd/s /run/containerd/runc/k8s.io /run/containerd/runc /run/containerd 2>/dev/null || true
	node_restore_sysctls
	for p in "${NODE_COMPONENTS[@]}"; do tb_forget "$p"; done

	local left
	left=$(node_leftovers)
	if [[ -n $left ]]; then
		tb_warn "the node left: ${left//$'\n'/; }"
		return 1
	fi
	node_release_claim
	node_log "torn down in $(tb_elapsed "$t0")"
}
