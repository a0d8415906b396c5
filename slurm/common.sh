# Shared by every drpo sbatch script (sourced; rendered scripts embed nothing from here but call it).
# Functions: drpo_env_network, drpo_on_signal, drpo_wait_trainer, drpo_node_addr, drpo_wait_router.

# ---- network / NCCL. Values are safe defaults; site-specific ones are commented.
drpo_env_network() {
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}              # INFO to debug multi-node hangs (very verbose)
  export NCCL_DEBUG_SUBSYS=${NCCL_DEBUG_SUBSYS:-INIT,NET}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed collective kills the job instead of hanging
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}            # flight-recorder dump names the stuck collective
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}          # Megatron TP/SP comm-compute overlap ordering
  export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}       # 1 only on clusters without InfiniBand/RoCE
  # export NCCL_SOCKET_IFNAME=ib0,eth0               # bootstrap interface: set when `hostname -i` is not routable
  # export GLOO_SOCKET_IFNAME=eth0                   # gloo (CPU groups, weight-sync rendezvous) interface
  # export NCCL_IB_HCA=mlx5_0,mlx5_1                 # pin HCAs on multi-rail nodes
  # export NCCL_NET_GDR_LEVEL=PHB                    # GPUDirect RDMA distance
  # export NCCL_CROSS_NIC=1                          # rail-optimized fabrics
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}         # compute nodes read local checkpoints only
  export TOKENIZERS_PARALLELISM=false
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
}

# ---- preemption. SIGUSR1 reaches the batch shell from `#SBATCH --signal=B:USR1@SECONDS` before
# the time limit (or `scancel --signal=USR1 --batch JOB`); SIGTERM from preemption or scancel.
# drpo_on_signal touches $DRPO_STOP_FILE; the trainer (drpo_megatron/operate/preempt.py) polls it
# after every step, saves a checkpoint, writes $DRPO_STOP_FILE.checkpointed and exits with 75.
# drpo_wait_trainer then requeues the job after SIGUSR1 (same job id; the requeued run resumes from
# <output_dir>/checkpoint, train.resume: auto). After SIGTERM it only waits: a user's scancel must
# stay cancelled, and preemption with --requeue is requeued by SLURM itself. The signal is not
# forwarded to srun: torchrun dies on SIGUSR1; the stop file reaches every rank on every node.
DRPO_TRAIN_PID=""
DRPO_SIGNAL=""
DRPO_GRACE_PID=""
DRPO_EXIT_PREEMPTED=75
drpo_on_signal() {
  local sig=$1
  [ -z "$DRPO_SIGNAL" ] || return 0   # already stopping (or requeued: SLURM's SIGTERM follows)
  DRPO_SIGNAL=$sig
  echo "[drpo] $(date -u +%FT%TZ) got SIG$sig: touched $DRPO_STOP_FILE; the trainer finishes its step, checkpoints and exits (grace ${DRPO_CKPT_GRACE_S}s)" >&2
  touch "$DRPO_STOP_FILE" || true
  if [ -n "$DRPO_TRAIN_PID" ]; then   # no checkpoint within the grace period: stop the trainer
    ( for _ in $(seq 1 "$DRPO_CKPT_GRACE_S"); do   # 1 s ticks: ends soon after the trainer does
        sleep 1; kill -0 "$DRPO_TRAIN_PID" 2>/dev/null || exit 0
      done
      echo "[drpo] no checkpoint after ${DRPO_CKPT_GRACE_S}s: sending SIGTERM to the trainer step" >&2
      kill -TERM "$DRPO_TRAIN_PID" 2>/dev/null || true ) &
    DRPO_GRACE_PID=$!
  fi
}

# ---- the job's last word: wait for the trainer step ($DRPO_TRAIN_PID), requeue after a
# preemption checkpoint that SIGUSR1 asked for, exit with the trainer's status otherwise.
drpo_wait_trainer() {
  local rc
  while :; do
    rc=0
    wait "$DRPO_TRAIN_PID" || rc=$?
    # a trapped signal interrupts `wait` (status > 128) while the trainer still runs: wait again
    if [ "$rc" -gt 128 ] && kill -0 "$DRPO_TRAIN_PID" 2>/dev/null; then continue; fi
    break
  done
  [ -z "$DRPO_GRACE_PID" ] || kill "$DRPO_GRACE_PID" 2>/dev/null || true
  echo "[drpo] $(date -u +%FT%TZ) trainer exited with $rc" >&2
  # torchrun reports a worker's exit 75 as 1: the marker file says the checkpoint was written
  if [ "$rc" = "$DRPO_EXIT_PREEMPTED" ] || [ -e "$DRPO_STOP_FILE.checkpointed" ]; then
    echo "[drpo] preemption checkpoint of step $(cut -d' ' -f1 "$DRPO_STOP_FILE.checkpointed" 2>/dev/null || echo '?') saved" >&2
    if [ "$DRPO_SIGNAL" = USR1 ]; then
      echo "[drpo] requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))" >&2
      scontrol requeue "$SLURM_JOB_ID" || { echo "[drpo] ERROR: scontrol requeue failed" >&2; exit 1; }
      exit 0
    fi
    exit "$DRPO_EXIT_PREEMPTED"
  fi
  exit "$rc"
}

# ---- the address other nodes reach a node at (SLURM's NodeAddr; the node name when unset)
drpo_node_addr() {
  local addr
  addr=$(scontrol show node "$1" -o 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
  echo "${addr:-$1}"
}

# ---- wait until the router lists the expected number of workers (or time out naming the missing)
drpo_wait_router() {
  local url=$1 want=$2 timeout_s=$3 t=0 have=0
  echo "[drpo] waiting up to ${timeout_s}s for $want rollout servers at router $url" >&2
  while [ $t -lt "$timeout_s" ]; do
    # sglang-router 0.3.2: GET /workers -> {"workers": [{"url", "is_healthy", ...}, ...]}
    have=$(curl -fsS "$url/workers" 2>/dev/null | python3 -c 'import json,sys; print(sum(1 for w in json.load(sys.stdin).get("workers", []) if w.get("is_healthy", True)))' 2>/dev/null || echo 0)
    if [ "$have" -ge "$want" ]; then echo "[drpo] $have/$want rollout servers registered after ${t}s" >&2; return 0; fi
    sleep 10; t=$((t + 10))
  done
  echo "[drpo] ERROR: only $have/$want rollout servers registered with $url after ${timeout_s}s; see $DRPO_LOG_DIR/rollout/*.log (last lines below)" >&2
  tail -n 5 "$DRPO_LOG_DIR"/rollout/*.log >&2 || true
  return 1
}
