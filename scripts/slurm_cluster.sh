#!/usr/bin/env bash
# Start and stop a throw-away, single-node SLURM 22.05 cluster (with
# accounting through slurmdbd + MariaDB) for CI and tests.
#
#   scripts/slurm_cluster.sh start DIR   # install if needed, configure, start
#   scripts/slurm_cluster.sh stop DIR    # stop everything started for DIR
#
# Everything (config, keys, state, logs, database, sockets, PID files) lives
# under DIR, on its own free ports, so the cluster never touches /etc/slurm,
# /etc/munge, /run/munge or a system MariaDB. After `start`, callers run
#   source DIR/env        # export SLURM_CONF=DIR/slurm.conf
# before any SLURM command. Must run as root (slurmd launches jobs as users).
#
# Partitions on the one node:  debug  (Default, PriorityTier=1, preemptable,
# jobs are requeued) and  urgent  (PriorityTier=10, preempts debug).
set -euo pipefail

readonly CLUSTER_NAME=ci
readonly START_TIMEOUT_S=${SLURM_CLUSTER_TIMEOUT:-90}
# Daemons in the order they are started; stop goes in reverse.
readonly DAEMONS=(munged mariadb slurmdbd slurmctld slurmd)
# Every process we launch carries this variable (its value is DIR), so stop
# can also find strays (e.g. slurmstepd) whose PID was never recorded.
readonly MARKER=SLURM_CLUSTER_SH_DIR

log() { printf '[slurm_cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    echo "usage: $0 {start|stop} DIR" >&2
    exit 2
}

# ---------------------------------------------------------------- install ---

required_bins_present() {
    local bin
    for bin in slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mungekey \
        mariadbd mariadb mariadb-install-db; do
        command -v "$bin" >/dev/null 2>&1 || return 1
    done
}

# Another apt/dpkg (e.g. a provisioning step started in the background) holds
# the dpkg lock; a second apt-get would fail, so wait for it instead.
wait_for_other_apt() {
    local waited=0
    while pgrep -x apt-get >/dev/null || pgrep -x apt >/dev/null ||
        pgrep -x dpkg >/dev/null; do
        ((waited == 0)) && log "waiting for a running apt-get/dpkg to finish"
        ((waited >= 900)) && die "apt-get/dpkg still running after ${waited}s"
        sleep 2
        waited=$((waited + 2))
    done
}

ensure_installed() {
    required_bins_present && return 0
    wait_for_other_apt
    required_bins_present && return 0
    log "installing slurm-wlm munge slurmdbd mariadb-server (takes ~1 min)"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Lock::Timeout: still wait if some apt starts between our check and here.
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
        slurm-wlm munge slurmdbd mariadb-server >/dev/null
    required_bins_present || die "packages installed but binaries still missing"
    log "installed in $((SECONDS - t0))s"
}

# ------------------------------------------------------------- processes ---

pid_file() { echo "$1/pids/$2.pid"; }

# True if PID is alive and was started for this DIR (guards against PID reuse
# and against killing another cluster's daemons).
pid_is_ours() {
    local pid=$1 dir=$2
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/environ ]] || return 1
    # (2>/dev/null first: zombies/kernel threads make the read fail.)
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "$MARKER=$dir"
}

recorded_pid() {
    local f
    f=$(pid_file "$1" "$2")
    [[ -s $f ]] && head -n1 "$f" | tr -dc '0-9'
    return 0
}

# All live processes carrying our marker for DIR (daemons, slurmstepd, ...).
marked_pids() {
    local dir=$1 p pid
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        pid_is_ours "$pid" "$dir" && echo "$pid"
    done
    return 0
}

# TERM, wait up to $3 seconds, then KILL.
terminate() {
    local dir=$1 timeout=$3 pid
    local -a pids=()
    for pid in $2; do pid_is_ours "$pid" "$dir" && pids+=("$pid"); done
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        local alive=0
        for pid in "${pids[@]}"; do pid_is_ours "$pid" "$dir" && alive=1; done
        ((alive)) || return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do
        if pid_is_ours "$pid" "$dir"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
    return 0
}

# Dead daemons were re-parented to PID 1 and linger as zombies until it reaps
# them (~1 s here); give it a moment so `pgrep slurm` right after stop is
# empty. Never fails: an init that does not reap only leaves harmless zombies.
wait_reaped() {
    local deadline=$((SECONDS + 5)) pid zombie
    while ((SECONDS < deadline)); do
        zombie=0
        for pid in "$@"; do
            [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && zombie=1
        done
        ((zombie)) || return 0
        sleep 0.2
    done
    return 0
}

# Run a command in the background, detached from the caller's session and
# stdio (so `$(scripts/slurm_cluster.sh start ...)` or a CI step does not hang
# waiting on our daemons' inherited pipes), tagged with the marker.
spawn() {
    local dir=$1 logfile=$2
    shift 2
    env "$MARKER=$dir" SLURM_CONF="$dir/slurm.conf" \
        setsid "$@" </dev/null >>"$logfile" 2>&1 &
}

# Poll CMD... until it succeeds; on timeout show the daemon logs and fail.
wait_for() {
    local dir=$1 what=$2
    shift 2
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${START_TIMEOUT_S}s waiting for $what"
            fail_start "$dir"
        fi
        sleep 0.3
    done
}

# Show what went wrong, then tear down whatever was started so CI leaks
# nothing.
fail_start() {
    local dir=$1 f
    for f in "$dir"/log/*.log; do
        [[ -s $f ]] || continue
        log "---- tail of $f ----"
        tail -n 25 "$f" >&2
    done
    stop_cluster "$dir"
    die "cluster in $dir failed to start (logs above)"
}

# ----------------------------------------------------------------- config ---

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Four consecutive free ports (slurmctld, slurmd, slurmdbd, MariaDB) so a
# system SLURM/MariaDB or another cluster from this script does not clash.
pick_port_base() {
    local base
    for ((base = 6817; base < 7817; base += 10)); do
        port_in_use "$base" || port_in_use $((base + 1)) ||
            port_in_use $((base + 2)) || port_in_use $((base + 3)) ||
            { echo "$base"; return 0; }
    done
    die "no free ports in 6817-7817"
}

# NodeName line from the hardware slurmd detects; RealMemory is lowered by
# 10% so the node is never drained for "Low RealMemory" when free memory
# fluctuates (memory is not a consumable resource here anyway: CR_Core).
node_line() {
    local line mem
    line=$(slurmd -C | head -n1)
    [[ $line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $line"
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
    echo "${line/RealMemory=$mem/RealMemory=$((mem * 9 / 10))}"
}

# Remove what a previous start in DIR left behind (only our own entries, so
# a DIR that also holds other files is safe), then recreate the layout.
prepare_dir() {
    local dir=$1 d
    rm -rf "${dir:?}"/{slurm.conf,slurmdbd.conf,env,munge,mysql,state,spool,log,pids}
    for d in "$dir" "$dir"/{munge,mysql,state,spool,log,pids}; do
        mkdir -p "$d"
        # 755: munge clients and mariadb-install-db helpers must traverse DIR.
        chmod 755 "$d"
    done
}

write_slurm_conf() {
    local dir=$1 base=$2 node
    node=$(node_line)
    cat >"$dir/slurm.conf" <<EOF
# Generated by scripts/slurm_cluster.sh for a single-node test cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$base
SlurmdPort=$((base + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may restart after ~12 s instead of ~2 min.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/pids/slurmctld.pid
SlurmdPidFile=$dir/pids/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
# No cgroups in containers/gVisor: track processes via /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((base + 2))
# Connections to slurmdbd take the munge socket from here, not from AuthInfo.
AccountingStoragePass=$dir/munge/munge.socket
JobCompType=jobcomp/none
# Fast scheduling/requeue for tests.
SchedulerParameters=bf_interval=2,sched_interval=2
JobRequeue=1
KillWait=5
# Finished jobs leave slurmctld after 10 s; sacct keeps them.
MinJobAge=10
ReturnToService=2
InactiveLimit=0
Waittime=0
# Higher PriorityTier partition preempts the lower one by requeueing its jobs.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES PriorityTier=1 MaxTime=INFINITE State=UP
PartitionName=urgent Nodes=ALL Default=NO PriorityTier=10 MaxTime=INFINITE State=UP
EOF
    chmod 644 "$dir/slurm.conf"
}

# slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF; it refuses
# to start unless the file is owned by SlurmUser with mode 600.
write_slurmdbd_conf() {
    local dir=$1 base=$2 db_pass=$3
    cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((base + 2))
SlurmUser=root
DebugLevel=info
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/pids/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((base + 3))
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$dir/slurmdbd.conf"
}

# ---------------------------------------------------------------- daemons ---

start_munged() {
    local dir=$1
    # A fresh random key per cluster; munged insists on 0400/0600 + owner.
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    spawn "$dir" "$dir/log/munged.stdout.log" munged \
        --key-file="$dir/munge/munge.key" \
        --socket="$dir/munge/munge.socket" \
        --pid-file="$(pid_file "$dir" munged)" \
        --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    wait_for "$dir" munged munge_works "$dir"
}

munge_works() {
    munge -n -S "$1/munge/munge.socket" | unmunge -S "$1/munge/munge.socket"
}

mariadb_client() {
    local dir=$1
    shift
    mariadb --no-defaults --socket="$dir/mysql/mysqld.sock" -uroot "$@"
}

# A private MariaDB instance (own datadir, socket and loopback port);
# --no-defaults keeps /etc/mysql/my.cnf (system socket, port 3306) out of it.
# It runs as root: the datadir then works even when DIR's parents are not
# searchable by the `mysql` user (e.g. under /root or a 700 mktemp dir).
start_mariadb() {
    local dir=$1 port=$2 db_pass=$3
    mariadb-install-db --no-defaults --user=root --datadir="$dir/mysql/data" \
        --skip-test-db >"$dir/log/mariadb-install.log" 2>&1 ||
        fail_start "$dir"
    spawn "$dir" "$dir/log/mariadb.log" mariadbd --no-defaults --user=root \
        --datadir="$dir/mysql/data" --socket="$dir/mysql/mysqld.sock" \
        --pid-file="$(pid_file "$dir" mariadb)" \
        --port="$port" --bind-address=127.0.0.1 --skip-name-resolve \
        --log-error="$dir/log/mariadb.log" \
        --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
    wait_for "$dir" mariadb mariadb_client "$dir" -e 'SELECT 1'
    # slurmdbd connects over TCP to 127.0.0.1 (it has no socket option).
    mariadb_client "$dir" -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" ||
        fail_start "$dir"
}

start_slurmdbd() {
    local dir=$1
    spawn "$dir" "$dir/log/slurmdbd.stdout.log" slurmdbd
    wait_for "$dir" slurmdbd sacctmgr -n list cluster
}

# Register the cluster before slurmctld starts so its first registration
# with slurmdbd succeeds; adding the cluster also creates the `root` account
# and root's (default) association, which is all jobs need to be recorded.
# An extra `ci` account with root in it lets tests check `sbatch -A ci`;
# without it SLURM silently records such jobs under `root` (no enforcement).
setup_accounting() {
    local dir=$1
    {
        sacctmgr -i add cluster "$CLUSTER_NAME" &&
            sacctmgr -i add account ci Cluster="$CLUSTER_NAME" \
                Description=ci Organization=ci &&
            sacctmgr -i add user root Account=ci Cluster="$CLUSTER_NAME"
    } >>"$dir/log/sacctmgr.log" 2>&1 || fail_start "$dir"
}

start_slurmctld() {
    local dir=$1
    spawn "$dir" "$dir/log/slurmctld.stdout.log" slurmctld
    wait_for "$dir" slurmctld scontrol ping
}

start_slurmd() {
    local dir=$1
    spawn "$dir" "$dir/log/slurmd.stdout.log" slurmd
    wait_for "$dir" "node $(hostname -s) idle" node_idle
    wait_for "$dir" "sacct" sacct -n -a -X -S now-1hours
}

node_idle() {
    [[ $(sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -n1) == idle ]]
}

running_pids() {
    local dir=$1 name pid
    for name in "${DAEMONS[@]}"; do
        pid=$(recorded_pid "$dir" "$name")
        [[ -n $pid ]] && pid_is_ours "$pid" "$dir" && echo "$pid"
    done
    return 0
}

# ------------------------------------------------------------ start/stop ---

start_cluster() {
    local dir=$1
    [[ $(id -u) == 0 ]] || die "must run as root"
    ensure_installed
    if [[ -n $(running_pids "$dir") ]]; then
        die "a cluster is already running in $dir; run: $0 stop $dir"
    fi
    local t0=$SECONDS base db_pass
    prepare_dir "$dir"
    base=$(pick_port_base)
    # (No `tr </dev/urandom | head`: with pipefail its SIGPIPE aborts us.)
    db_pass=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
    write_slurm_conf "$dir" "$base"
    write_slurmdbd_conf "$dir" "$base" "$db_pass"
    # Every SLURM client command below (and in callers) uses this config.
    export SLURM_CONF=$dir/slurm.conf
    echo "export SLURM_CONF=$SLURM_CONF" >"$dir/env"

    start_munged "$dir"
    start_mariadb "$dir" $((base + 3)) "$db_pass"
    start_slurmdbd "$dir"
    setup_accounting "$dir"
    start_slurmctld "$dir"
    start_slurmd "$dir"

    log "cluster up in $((SECONDS - t0))s (ports $base-$((base + 3)), logs in $dir/log)"
    sinfo >&2
    echo "export SLURM_CONF=$SLURM_CONF"
}

# Cancel jobs while slurmctld/slurmd still run, so job processes are killed
# by SLURM itself and are not left orphaned when the daemons go away.
cancel_jobs() {
    local dir=$1
    [[ -r $dir/slurm.conf ]] || return 0
    local slurmctld_pid
    slurmctld_pid=$(recorded_pid "$dir" slurmctld)
    [[ -n $slurmctld_pid ]] && pid_is_ours "$slurmctld_pid" "$dir" || return 0
    local jobs
    jobs=$(SLURM_CONF=$dir/slurm.conf timeout 10 squeue -h -o %i 2>/dev/null) || return 0
    [[ -n $jobs ]] || return 0
    # shellcheck disable=SC2086  # one argument per job id
    SLURM_CONF=$dir/slurm.conf timeout 10 scancel $jobs 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while ((SECONDS < deadline)); do
        [[ -z $(SLURM_CONF=$dir/slurm.conf timeout 10 squeue -h -o %i 2>/dev/null) ]] && return 0
        sleep 0.5
    done
}

stop_cluster() {
    local dir=$1 i name
    local -a pids=()
    cancel_jobs "$dir"
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        pids+=("$(recorded_pid "$dir" "$name")")
        terminate "$dir" "${pids[-1]}" 15
    done
    # Strays: slurmstepd and anything else we launched but did not record.
    local strays
    strays=$(marked_pids "$dir")
    terminate "$dir" "$strays" 5
    # shellcheck disable=SC2086  # one argument per PID
    wait_reaped "${pids[@]}" $strays
    rm -f "$dir"/pids/*.pid "$dir"/munge/munge.socket* "$dir"/mysql/mysqld.sock
    log "stopped cluster in $dir"
}

main() {
    (($# == 2)) || usage
    local cmd=$1 dir
    [[ -n $2 ]] || usage
    if [[ $cmd == stop && ! -d $2 ]]; then
        log "nothing to stop: $2 does not exist"
        return 0
    fi
    # Absolute path: it is written into configs and compared with the marker.
    mkdir -p "$2"
    dir=$(cd "$2" && pwd -P)
    case $cmd in
    start) start_cluster "$dir" ;;
    stop) stop_cluster "$dir" ;;
    *) usage ;;
    esac
}

# Sourcing the file (for debugging) defines the functions without running.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
