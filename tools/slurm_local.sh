#!/usr/bin/env bash
# A real SLURM cluster on one machine (Debian slurm-wlm 22.05) with job accounting: munged,
# MariaDB (private datadir), slurmdbd, slurmctld and two slurmd (nodes n1, n2 on 127.0.0.1,
# distinct ports, one fake GPU each); all state, logs and pid files in $DRPO_SLURM_DIR
# (default /tmp/drpo-slurm).
#
#   tools/slurm_local.sh start    # needs root and the packages in .ci/apt-packages.txt
#   tools/slurm_local.sh stop     # cancel this cluster's jobs, stop the daemons started here
#   tools/slurm_local.sh test     # the CI tests: pytest tests/operate/test_slurm_local.py
#
# Every client command needs SLURM_CONF=$DRPO_SLURM_DIR/etc/slurm.conf (`start` prints it).
# Ports (env DRPO_SLURM_PORT_BASE, default 16800): +17 slurmctld, +19 slurmdbd, +6 MariaDB,
# +201/+202 slurmd n1/n2.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=${DRPO_SLURM_DIR:-/tmp/drpo-slurm}
export SLURM_CONF=$D/etc/slurm.conf
B=${DRPO_SLURM_PORT_BASE:-16800}
CTLD_PORT=$((B + 17)) DBD_PORT=$((B + 19)) DB_PORT=$((B + 6)) SLURMD_PORT=$((B + 200))
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

die() { echo "slurm_local: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local n=$1 what=$2; shift 2
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "$what not up after ${n}s; logs in $D/log/"
}

write_conf() {
  mkdir -p "$D"/etc "$D"/state "$D"/spool "$D"/log "$D"/run "$D"/dev "$D"/mysql
  for i in 0 1; do [ -e "$D/dev/nvidia$i" ] || mknod "$D/dev/nvidia$i" c 1 3; done
  cat > "$D/etc/slurm.conf" <<EOF
ClusterName=drpolocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=30
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MpiDefault=none
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
# requeued jobs wait cred_expire+1 s (default 120), then start at the next scheduling pass
SchedulerParameters=bf_interval=5,sched_interval=10
InactiveLimit=0
KillWait=30
MinJobAge=600
NodeName=n1 NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + 1)) CPUs=2 RealMemory=8000 Gres=gpu:1 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + 2)) CPUs=2 RealMemory=8000 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  cat > "$D/etc/gres.conf" <<EOF
NodeName=n1 Name=gpu File=$D/dev/nvidia0
NodeName=n2 Name=gpu File=$D/dev/nvidia1
EOF
  cat > "$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=drpo-local
StorageLoc=drpo_acct
EOF
  chmod 600 "$D/etc/slurmdbd.conf"
}

start_db() {
  if [ ! -d "$D/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$D/mysql" --skip-test-db \
      > "$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $D/log/mariadb-install.log"
  fi
  if ! alive "$D/run/mariadbd.pid"; then
    mariadbd --user=root --datadir="$D/mysql" --socket="$D/run/mysqld.sock" --port="$DB_PORT" \
      --bind-address=127.0.0.1 --pid-file="$D/run/mariadbd.pid" --log-error="$D/log/mariadbd.log" \
      --innodb-buffer-pool-size=64M --skip-log-bin > /dev/null 2>&1 &
  fi
  wait_for 60 MariaDB mariadb-admin --socket="$D/run/mysqld.sock" ping
  mariadb --socket="$D/run/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'drpo-local';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'drpo-local';
    GRANT ALL ON drpo_acct.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON drpo_acct.* TO 'slurm'@'localhost';" || die "MariaDB: could not create the slurm user"
}

start() {
  [ "$(id -u)" = 0 ] || die "needs root (daemons, mknod)"
  for b in munged mariadbd slurmdbd slurmctld slurmd sbatch sacct; do
    command -v "$b" >/dev/null || die "$b not installed: apt-get install -y $PKGS"
  done
  write_conf
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! pgrep -u munge -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start"
    touch "$D/run/munged.started-here"
  fi
  start_db
  alive "$D/run/slurmdbd.pid" || slurmdbd
  wait_for 60 slurmdbd sacctmgr -n show cluster
  sacctmgr -i -Q add cluster drpolocal >/dev/null 2>&1 || true   # registered once (exists: no-op)
  alive "$D/run/slurmctld.pid" || slurmctld
  for n in n1 n2; do alive "$D/run/slurmd-$n.pid" || slurmd -N "$n"; done
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE 'idle|mixed|allocated')" -ge 2 ]; then
      sinfo; echo "export SLURM_CONF=$SLURM_CONF"; return 0
    fi
    sleep 1
  done
  sinfo || true
  die "nodes did not become idle in 60 s; see $D/log/"
}

stop() {
  # jobs first: slurmstepd (and the job's processes) outlive slurmd
  if alive "$D/run/slurmctld.pid"; then
    scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 1 90); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  local f pid
  for f in "$D"/run/slurmd-*.pid "$D/run/slurmctld.pid" "$D/run/slurmdbd.pid" "$D/run/mariadbd.pid"; do
    alive "$f" || continue
    pid=$(cat "$f"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  done
  if [ -e "$D/run/munged.started-here" ]; then
    pid=$(pgrep -u munge -x munged || true)
    if [ -n "$pid" ]; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$D/run/munged.started-here"
  fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  test) cd "$ROOT" && OMP_NUM_THREADS=1 exec "${PYTHON:-$ROOT/.venv/bin/python}" -m pytest tests/operate/test_slurm_local.py -v ;;
  *) die "usage: $0 start|stop|test" ;;
esac
