#!/usr/bin/env bash
# A real SLURM cluster on one machine (Debian slurm-wlm 22.05): munged, slurmctld and two slurmd
# (nodes n1, n2 on 127.0.0.1, distinct ports, one fake GPU each), all state in $DRPO_SLURM_DIR.
#
#   tools/slurm_local.sh start    # needs root and: apt-get install slurmctld slurmd slurm-client munge
#   tools/slurm_local.sh test     # start + `drpo submit` the embedded CPU job (2 steps) and check it
#   tools/slurm_local.sh stop     # stop the daemons started here (by pid file)
#
# `test` checks: the job reaches COMPLETED with exit code 0:0 (jobcomp/filetxt record; this setup
# has no slurmdbd, so `sacct` is replaced by the job completion log), its log directory holds the
# resolved config and the trainer log, and the run's metrics.jsonl has the expected steps.
# Every command of the cluster needs SLURM_CONF=$DRPO_SLURM_DIR/etc/slurm.conf (exported here).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=${DRPO_SLURM_DIR:-/tmp/drpo-slurm}
export SLURM_CONF=$D/etc/slurm.conf
PY=${PYTHON:-$ROOT/.venv/bin/python}
STEPS=${DRPO_SLURM_TEST_STEPS:-2}
JOB_TIMEOUT_S=${DRPO_SLURM_JOB_TIMEOUT_S:-1500}

die() { echo "slurm_local: $*" >&2; exit 1; }

write_conf() {
  mkdir -p "$D"/etc "$D"/state "$D"/spool "$D"/log "$D"/run "$D"/dev
  for i in 0 1; do [ -e "$D/dev/nvidia$i" ] || mknod "$D/dev/nvidia$i" c 1 3; done
  cat > "$D/etc/slurm.conf" <<EOF
ClusterName=drpolocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
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
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=30
MinJobAge=600
NodeName=n1 NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=8000 Gres=gpu:1 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=8000 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  cat > "$D/etc/gres.conf" <<EOF
NodeName=n1 Name=gpu File=$D/dev/nvidia0
NodeName=n2 Name=gpu File=$D/dev/nvidia1
EOF
}

start() {
  [ "$(id -u)" = 0 ] || die "needs root (daemons, mknod)"
  command -v slurmctld >/dev/null || die "slurmctld not installed: apt-get install slurmctld slurmd slurm-client munge"
  write_conf
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! pgrep -u munge -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start"
  fi
  [ -s "$D/run/slurmctld.pid" ] && kill -0 "$(cat "$D/run/slurmctld.pid")" 2>/dev/null || slurmctld
  for n in n1 n2; do
    [ -s "$D/run/slurmd-$n.pid" ] && kill -0 "$(cat "$D/run/slurmd-$n.pid")" 2>/dev/null || slurmd -N "$n"
  done
  for _ in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed)'; then
      [ "$(sinfo -h -N -o '%T' | grep -cE 'idle|mixed')" -ge 2 ] && { sinfo; return 0; }
    fi
    sleep 1
  done
  sinfo || true
  die "nodes did not become idle in 60 s; see $D/log/"
}

stop() {
  for f in "$D"/run/slurmd-*.pid "$D"/run/slurmctld.pid; do
    [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
}

test_job() {
  start
  local run=$D/run-embedded cfg=$D/embedded.yaml
  rm -rf "$run"
  # the embedded CPU default, shortened; a generous SGLang start-up timeout (a loaded 2-core
  # machine needed > 300 s)
  "$PY" - "$ROOT/model_configs/tiny_qwen3_moe_cpu.yaml" "$cfg" "$run" "$STEPS" <<'EOF'
import sys, yaml
src, dst, run, steps = sys.argv[1:]
c = yaml.safe_load(open(src))
c["output_dir"] = run
c["train"].update(max_steps=int(steps), eval_every=1000)
c["rollout"].setdefault("server", {})["startup_timeout_s"] = 1200.0
yaml.safe_dump(c, open(dst, "w"), sort_keys=False)
EOF
  local out
  out=$(cd "$ROOT" && "$PY" -m drpo_megatron.cli submit "$cfg" --nodes 1 --rollout-nodes 0 \
        --cpus-per-task 2 --time 00:30:00 --python "$PY")
  echo "$out"
  local job
  job=$(echo "$out" | sed -n 's/^submitted job \([0-9]*\).*/\1/p')
  [ -n "$job" ] || die "no job id from drpo submit"
  local t=0
  while squeue -h -j "$job" 2>/dev/null | grep -q .; do
    sleep 5; t=$((t + 5)); [ $t -lt "$JOB_TIMEOUT_S" ] || { scancel "$job"; die "job $job still running after ${JOB_TIMEOUT_S}s"; }
  done
  local rec
  rec=$(grep "JobId=$job " "$D/log/jobcomp.txt" || true)
  echo "jobcomp: $rec"
  echo "$rec" | grep -q "JobState=COMPLETED" || { tail -n 30 "$run"/slurm-logs/*-"$job".sbatch.out "$run"/slurm-logs/*-"$job"/trainer/*.log 2>/dev/null; die "job $job did not complete"; }
  echo "$rec" | grep -q "ExitCode=0:0" || die "job $job exit code is not 0:0"
  local logdir
  logdir=$(ls -d "$run"/slurm-logs/*-"$job")
  [ -f "$logdir/config.yaml" ] || die "no resolved config in $logdir"
  ls "$logdir"/trainer/node-*.log >/dev/null || die "no trainer log in $logdir/trainer"
  local steps
  steps=$("$PY" - "$run/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(max((r.get("step", 0) for r in rows), default=0))
EOF
)
  [ "$steps" -ge "$STEPS" ] || die "metrics.jsonl reaches step $steps, expected $STEPS"
  echo "slurm_local: OK: job $job COMPLETED 0:0, $steps steps in $run/metrics.jsonl, logs in $logdir"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  test) test_job ;;
  *) die "usage: $0 start|stop|test" ;;
esac
