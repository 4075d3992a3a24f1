#!/usr/bin/env bash
# A real multi-node Slurm on this machine: N hosts made of network + UTS namespaces, for tests and demos.
#   tools/slurm_cluster.sh start [N]   N nodes (default $RNTP_CLUSTER_NODES or 3); prints "started" or "already up"
#   tools/slurm_cluster.sh stop        stop the daemons by recorded PID, kill what still runs in our namespaces,
#                                      delete the namespaces (their links go with them), drop our /etc/hosts lines
#   tools/slurm_cluster.sh status      exit 0 when the controller answers and every node is usable
#   tools/slurm_cluster.sh login CMD.. run CMD on the login node `ctl` (e.g. `login sbatch -N 3 slurm/train.sbatch ..`)
# Hosts: `ctl` (slurmctld, slurmdbd, MariaDB; the login node) and node1..N (one slurmd each), each a network
# namespace with its own loopback and one veth (eth0, 10.77.0.X/24 by default) whose peer sits on a bridge in a
# namespace of its own (a bridge in the root namespace passes no traffic through its filters); each daemon also
# gets its own UTS namespace whose hostname is its node's name. Names go into /etc/hosts (removed on stop).
# $RNTP_CLUSTER_LOOPBACK_NAMES (e.g. "node3"): nodes whose own name resolves, on that node only, to 127.0.1.1 first,
# as Debian's installer writes /etc/hosts (a file of that node's own, bound over /etc/hosts in its mount namespace):
# a process there that advertises its hostname's address (gloo does) offers loopback to other hosts.
# Only addresses on interfaces this script creates, inside namespaces it makes, are used.
# Beside the one-node tools/slurm_local.sh: its own state ($RNTP_CLUSTER_STATE, default /tmp/rntp-cluster), its
# own config ($STATE/etc/slurm.conf: export SLURM_CONF to it, `login` does), its own munged socket and database;
# all ports are inside our namespaces. Root only. Install the packages first with tools/install_launch.sh.
set -euo pipefail
STATE=${RNTP_CLUSTER_STATE:-/tmp/rntp-cluster}
NET=${RNTP_CLUSTER_NET:-10.77.0}  # a private /24 on our bridge only
BRIDGE_NS=rntp-bridge
CTL=ctl
CTL_ADDR=$NET.1
export SLURM_CONF=$STATE/etc/slurm.conf
MUNGE_SOCKET=/run/munge/munge.socket.2  # inside our mount namespaces: $STATE/munge/munge.socket.2
HOSTS_MARK="# rntp-slurm-cluster"

# shellcheck source=tools/slurm_common.sh
source "$(dirname "$0")/slurm_common.sh"
# Everything of the cluster runs in a mount namespace of its own where /run/munge is our munged's folder: Slurm's
# connections to slurmdbd ignore AuthInfo's socket= and always use munge's default socket.
with_munge() { unshare -m --propagation private sh -c 'mount --bind "$0" /run/munge && exec "$@"' "$STATE/munge" "$@"; }
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" unshare -m --propagation private \
    sh -c 'mount --bind "$0" /run/munge && exec "$@"' "$STATE/munge" "$@"; }
# a daemon of host NAME: its network namespace, a UTS namespace of its own whose hostname is NAME (and its own
# /etc/hosts where make_network wrote one)
on_host() { local ns=$1; shift; nsenter --net="/run/netns/$ns" unshare -m -u --propagation private \
    sh -c 'mount --bind "$1" /run/munge && { [ ! -f "$2" ] || mount --bind "$2" /etc/hosts; } && hostname "$0" \
           && shift 2 && exec "$@"' "$ns" "$STATE/munge" "$STATE/hosts.$ns" "$@"; }
nodes() { cat "$STATE/nodes" 2>/dev/null; }
controller_up() { in_ns "$CTL" scontrol ping 2>/dev/null | grep -q UP; }
nodes_usable() {
    local want have
    want=$(nodes | wc -l)
    have=$(in_ns "$CTL" sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated|completing)')
    [ "$want" -gt 0 ] && [ "$have" -eq "$want" ]
}

make_network() {  # the bridge namespace, then one namespace + veth + address per host
    local count=$1 i=0 host
    ip netns add "$BRIDGE_NS"
    echo "$BRIDGE_NS" >> "$STATE/namespaces"
    ip -n "$BRIDGE_NS" link add br0 type bridge
    ip -n "$BRIDGE_NS" link set br0 up
    : > "$STATE/nodes"
    for host in "$CTL" $(seq -f 'node%g' "$count"); do
        ip netns add "$host"
        echo "$host" >> "$STATE/namespaces"
        # eth0 in the host's namespace, its peer on the bridge
        ip link add eth0 netns "$host" type veth peer name "v-$host" netns "$BRIDGE_NS"
        ip -n "$BRIDGE_NS" link set "v-$host" master br0 up
        ip -n "$host" link set lo up
        if [ "$host" = "$CTL" ]; then local addr=$CTL_ADDR; else i=$((i + 1)); local addr=$NET.$((10 + i)); fi
        ip -n "$host" addr add "$addr/24" dev eth0
        ip -n "$host" link set eth0 up
        echo "$addr $host $HOSTS_MARK" >> /etc/hosts
        [ "$host" = "$CTL" ] || echo "$host $addr" >> "$STATE/nodes"
    done
    rm -f "$STATE"/hosts.*
    for host in ${RNTP_CLUSTER_LOOPBACK_NAMES:-}; do
        { echo "127.0.1.1 $host"; cat /etc/hosts; } > "$STATE/hosts.$host"
    done
}

start_munge() {  # a munged of our own (own socket, key and pid), so the one-node cluster's munged is not shared
    mkdir -p "$STATE/munge"
    [ -s "$STATE/munge/munge.key" ] || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1 count=1024 status=none
    chown -R munge:munge "$STATE/munge"
    chmod 755 "$STATE/munge"
    chmod 400 "$STATE/munge/munge.key"
    # --force: container file systems often show permissions munged calls insecure
    mkdir -p /run/munge
    with_munge runuser -u munge -- /usr/sbin/munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/seed"
    wait_for 50 0.1 with_munge sh -c 'munge -n </dev/null'
    cp "$STATE/munge/munged.pid" "$STATE/run/munged.pid"
}

start_accounting() {  # MariaDB and slurmdbd on the controller host
    mkdir -p "$STATE/mysql"
    chown mysql:mysql "$STATE/mysql"
    [ -d "$STATE/mysql/data/mysql" ] || runuser -u mysql -- mariadb-install-db --datadir="$STATE/mysql/data" \
        --auth-root-authentication-method=socket >/dev/null
    on_host "$CTL" /usr/sbin/mariadbd --user=mysql --datadir="$STATE/mysql/data" --socket="$STATE/mysql/mysqld.sock" \
        --bind-address=127.0.0.1 --port=3306 --pid-file="$STATE/mysql/mariadbd.pid" \
        --log-error="$STATE/log/mariadb.err" >/dev/null 2>&1 &
    wait_for 150 0.2 mariadb-admin --socket="$STATE/mysql/mysqld.sock" ping
    cp "$STATE/mysql/mariadbd.pid" "$STATE/run/mariadbd.pid"
    local password
    password=$(cat "$STATE/dbpass" 2>/dev/null || head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$password" > "$STATE/dbpass"
    chmod 600 "$STATE/dbpass"
    mariadb --socket="$STATE/mysql/mysqld.sock" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
    umask 077  # slurmdbd refuses a group- or world-readable config
    printf '%s\n' AuthType=auth/munge DbdHost=$CTL DbdAddr=$CTL_ADDR DbdPort=6819 \
        SlurmUser=root StorageType=accounting_storage/mysql StorageHost=127.0.0.1 StoragePort=3306 \
        StorageUser=slurm "StoragePass=$password" StorageLoc=slurm_acct_db \
        "PidFile=$STATE/run/slurmdbd.pid" "LogFile=$STATE/log/slurmdbd.log" > "$STATE/etc/slurmdbd.conf"
    umask 022
    on_host "$CTL" /usr/sbin/slurmdbd
    wait_for 100 0.2 in_ns "$CTL" sacctmgr -n show cluster
    in_ns "$CTL" sacctmgr -i add cluster rntp >/dev/null 2>&1 || true
}

write_slurm_conf() {
    local cpus mem names
    # see slurm_local.sh: the installed processors, trusted by slurmd (config_overrides)
    cpus=$(getconf _NPROCESSORS_CONF)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    names=$(nodes | awk '{print $1}' | paste -sd, -)
    cat > "$SLURM_CONF" <<EOF
ClusterName=rntp
SlurmctldHost=$CTL($CTL_ADDR)
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
AccountingStorageHost=$CTL
$(slurm_conf_common)
EOF
    while read -r name addr; do
        echo "NodeName=$name NodeAddr=$addr NodeHostname=$name CPUs=$cpus RealMemory=$mem State=UNKNOWN" >> "$SLURM_CONF"
    done < <(nodes)
    echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$SLURM_CONF"
}

start() {
    local count=${1:-${RNTP_CLUSTER_NODES:-3}}
    if [ -s "$STATE/nodes" ] && controller_up && nodes_usable; then
        echo "already up"
        return 0
    fi
    [ "$(id -u)" = 0 ] || { echo "slurm_cluster.sh: namespaces and daemons need root" >&2; exit 1; }
    [ -x /usr/sbin/slurmctld ] || { echo "slurm_cluster.sh: Slurm is not installed: run tools/install_launch.sh" >&2; exit 1; }
    [ -s "$STATE/namespaces" ] && stop >/dev/null  # a half-started cluster of an earlier run
    rm -rf "$STATE"
    mkdir -p "$STATE"/{etc,log,run,spool/ctld}
    make_network "$count"
    while read -r name _; do mkdir -p "$STATE/spool/$name"; done < <(nodes)
    start_munge
    write_slurm_conf  # sacctmgr reads it to find slurmdbd
    start_accounting
    on_host "$CTL" /usr/sbin/slurmctld -i  # -i: ignore state left by an earlier run
    wait_for 100 0.1 controller_up || { echo "slurmctld did not come up; see $STATE/log" >&2; exit 1; }
    while read -r name _; do on_host "$name" /usr/sbin/slurmd -N "$name"; done < <(nodes)
    wait_for 150 0.2 nodes_usable || { echo "slurmd did not register on every node; see $STATE/log" >&2; exit 1; }
    in_ns "$CTL" scontrol update NodeName="$(nodes | awk '{print $1}' | paste -sd, -)" State=RESUME >/dev/null 2>&1 || true
    echo "started: $(nodes | tr '\n' ' ')(SLURM_CONF=$SLURM_CONF; submit with: $0 login sbatch ...)"
}

stop() {
    local f pid ns
    for f in "$STATE"/run/slurmd-*.pid "$STATE"/run/{slurmctld,slurmdbd,mariadbd,munged}.pid; do
        stop_recorded "$f"
    done
    # what jobs left running on our hosts (e.g. a server of a cancelled job) lives only in our namespaces
    while read -r ns; do
        [ -e "/run/netns/$ns" ] || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done < <(cat "$STATE/namespaces" 2>/dev/null)
    rm -f "$STATE/namespaces"
    if grep -q "$HOSTS_MARK" /etc/hosts; then  # rewritten in place: /etc/hosts is often a bind mount
        local kept
        kept=$(grep -v "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$kept" > /etc/hosts
    fi
    echo "stopped"
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) stop ;;
    status) [ -s "$STATE/nodes" ] && controller_up && nodes_usable ;;
    login) shift; in_ns "$CTL" "$@" ;;
    *) echo "usage: $0 start [N]|stop|status|login CMD..." >&2; exit 2 ;;
esac
