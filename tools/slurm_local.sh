#!/usr/bin/env bash
# A real one-node Slurm on 127.0.0.1 for tests: munged, MariaDB + slurmdbd (accounting, so `sacct` works),
# slurmctld and slurmd, started by hand (no systemd, no cgroups) as root.
#   tools/slurm_local.sh start     start what is not running; prints "started" or "already up"
#   tools/slurm_local.sh stop      stop, by the PIDs recorded at start, only the daemons this script started
#   tools/slurm_local.sh status    exit 0 when the controller answers, the node is usable and accounting works
# State (pid files, logs, spool, database) lives in $RNTP_SLURM_STATE (default /tmp/rntp-slurm).
# Install the packages first with tools/install_launch.sh.
set -euo pipefail
STATE=${RNTP_SLURM_STATE:-/tmp/rntp-slurm}
NODE=localhost  # NodeName == NodeHostname; must resolve to 127.0.0.1
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)  # stop order

# shellcheck source=tools/slurm_common.sh
source "$(dirname "$0")/slurm_common.sh"

node_usable() { sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }
controller_up() { scontrol ping 2>/dev/null | grep -q UP; }
accounting_up() { sacctmgr -n show cluster 2>/dev/null | grep -q .; }  # slurmdbd reaches its database

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge  # clients reach the socket
    munge -n </dev/null >/dev/null 2>&1 && return 0
    # --force: container file systems often show permissions munged calls insecure
    runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
    wait_for 50 0.1 sh -c 'munge -n </dev/null'
    cp /run/munge/munged.pid "$STATE/run/munged.pid"
}

start_accounting() {
    mkdir -p /run/mysqld "$STATE/mysql"
    chown mysql:mysql /run/mysqld "$STATE/mysql"
    if ! mariadb-admin ping >/dev/null 2>&1; then
        [ -d "$STATE/mysql/mysql" ] || mariadb-install-db --user=mysql --datadir="$STATE/mysql" \
            --auth-root-authentication-method=socket >/dev/null
        /usr/sbin/mariadbd --user=mysql --datadir="$STATE/mysql" --socket=/run/mysqld/mysqld.sock \
            --bind-address=127.0.0.1 --port=3306 --pid-file="$STATE/mysql/mariadbd.pid" \
            --log-error="$STATE/log/mariadb.err" >/dev/null 2>&1 &
        wait_for 150 0.2 mariadb-admin ping
        cp "$STATE/mysql/mariadbd.pid" "$STATE/run/mariadbd.pid"  # the mysql user cannot write $STATE/run
    fi
    local password
    password=$(cat "$STATE/dbpass" 2>/dev/null || head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$password" > "$STATE/dbpass"
    chmod 600 "$STATE/dbpass"
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$password';
                ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$password';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    umask 077  # slurmdbd refuses a group- or world-readable config
    printf '%s\n' AuthType=auth/munge DbdHost=localhost DbdAddr=127.0.0.1 DbdPort=6819 SlurmUser=root \
        StorageType=accounting_storage/mysql StorageHost=localhost StorageUser=slurm \
        "StoragePass=$password" StorageLoc=slurm_acct_db \
        "PidFile=$STATE/run/slurmdbd.pid" "LogFile=$STATE/log/slurmdbd.log" > /etc/slurm/slurmdbd.conf
    umask 022
    /usr/sbin/slurmdbd
    wait_for 100 0.2 sacctmgr -n show cluster
    sacctmgr -i add cluster local >/dev/null 2>&1 || true
}

write_slurm_conf() {
    local cpus mem
    # the installed processors (plain nproc follows OMP_NUM_THREADS, which tests set to 1; a CI run once saw
    # `nproc --all` and slurmd's own detection report 1 on this 2-core machine, so the count comes from
    # sysconf and slurmd is told to trust the configuration: SlurmdParameters=config_overrides)
    cpus=$(getconf _NPROCESSORS_CONF)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > /etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$NODE
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageHost=localhost
$(slurm_conf_common)
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start() {
    if controller_up && node_usable && accounting_up; then
        echo "already up"
        return 0
    fi
    # a partial cluster (say its database died: jobs run, `sacct` fails) starts over from what was recorded
    for d in "${DAEMONS[@]}"; do stop_recorded "$STATE/run/$d.pid"; done
    [ "$(id -u)" = 0 ] || { echo "slurm_local.sh: starting the daemons needs root" >&2; exit 1; }
    command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || {
        echo "slurm_local.sh: Slurm is not installed: run tools/install_launch.sh" >&2; exit 1; }
    mkdir -p "$STATE"/{log,run,spool/ctld,spool/d} /etc/slurm
    # slurmd refuses to start when its NodeName does not resolve
    grep -qE '^127\.0\.0\.1\s.*\blocalhost\b' /etc/hosts || echo '127.0.0.1 localhost' >> /etc/hosts
    start_munge
    write_slurm_conf  # sacctmgr reads it to find slurmdbd
    start_accounting
    /usr/sbin/slurmctld -i  # -i: ignore state left by an earlier run
    wait_for 100 0.1 controller_up || { echo "slurmctld did not come up; see $STATE/log" >&2; exit 1; }
    /usr/sbin/slurmd -N "$NODE"  # -N: our NodeName is not `hostname`
    wait_for 100 0.2 node_usable || { echo "slurmd did not register; see $STATE/log" >&2; exit 1; }
    scontrol update NodeName=$NODE State=RESUME >/dev/null 2>&1 || true
    echo "started"
}

stop() {
    for d in "${DAEMONS[@]}"; do stop_recorded "$STATE/run/$d.pid"; done
    echo "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) controller_up && node_usable && accounting_up ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
