# Sourced by tools/slurm_local.sh and tools/slurm_cluster.sh: what the one-node and the namespace cluster share.

wait_for() {  # wait_for TRIES SLEEP CMD... : retry a check
    local tries=$1 pause=$2
    shift 2
    for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep "$pause"; done
    return 1
}

stop_recorded() {  # stop_recorded PIDFILE: TERM the process it names, KILL it after 10 s, remove the file
    local pid
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$1"
}

# slurm.conf lines of both: no cgroups, accounting through slurmdbd, quick scheduling and requeue
slurm_conf_common() {
    cat <<'EOF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=15
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
# no cgroups: their plugins fail in containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStoragePort=6819
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
# look at pending jobs every few seconds (defaults 60/30 s): a requeued job starts soon after it may
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
EOF
}
