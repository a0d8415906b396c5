# Shared by every drpo sbatch script (sourced; rendered scripts embed nothing from here but call it).
# Functions: drpo_env_network, drpo_on_signal, drpo_wait_trainer, drpo_node_addr, drpo_bind_addr,
# drpo_rollout_node, drpo_wait_router.  Values from `drpo submit` arrive as variables or arguments,
# never as text pasted into commands.

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

# ---- the address this node's rollout servers and router bind to and are reached at (never
# 0.0.0.0): the IPv4 address of $DRPO_BIND_INTERFACE (rollout.server.bind_interface, e.g. ib0) or,
# when that is empty, SLURM's NodeAddr of the node ($1, default this one) resolved to an address
drpo_bind_addr() {
  local node=${1:-${SLURMD_NODENAME:-$(hostname -s)}} addr=""
  if [ -n "${DRPO_BIND_INTERFACE:-}" ]; then
    addr=$(ip -4 -o addr show dev "$DRPO_BIND_INTERFACE" 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
  else
    addr=$(getent ahostsv4 "$(drpo_node_addr "$node")" 2>/dev/null | awk '{print $1; exit}')
  fi
  if [ -z "$addr" ] || [ "$addr" = 0.0.0.0 ]; then
    echo "[drpo] ERROR: no IPv4 address to bind to on node $node (interface '${DRPO_BIND_INTERFACE:-}'); set rollout.server.bind_interface to the cluster network's interface (e.g. ib0)" >&2
    return 1
  fi
  echo "$addr"
}

# ---- one rollout node (srun runs this on it): N SGLang servers of TP GPUs each, bound to the
# node's cluster address, started with the job's API key ($DRPO_API_KEY_FILE: the key is in no
# command line); each registers with the router ($DRPO_ROUTER_URL) once /health answers.
# Arguments: N TP BASE_PORT MODEL_PATH [extra SGLang arguments...]
drpo_rollout_node() {
  local n=$1 tp=$2 base=$3 model=$4 addr i port first gpus
  shift 4
  addr=$(drpo_bind_addr) || return 1
  for i in $(seq 0 $((n - 1))); do
    port=$((base + i)); first=$((i * tp))
    gpus=$(seq -s, "$first" $((first + tp - 1)))
    CUDA_VISIBLE_DEVICES=$gpus "$PY" -m drpo_megatron.rollout.launch sglang --model-path "$model" \
      --tp "$tp" --host "$addr" --port "$port" --dtype bfloat16 "$@" \
      >> "$DRPO_LOG_DIR/rollout/server-$(hostname)-$port.log" 2>&1 &
    ( until curl -fsS "http://$addr:$port/health" >/dev/null 2>&1; do sleep 5; done
      "$PY" -m drpo_megatron.rollout.launch register "$DRPO_ROUTER_URL" "http://$addr:$port" ) &
  done
  wait
}

# ---- wait until the router lists the expected number of workers (or time out naming the missing)
drpo_wait_router() {
  local url=$1 want=$2 timeout_s=$3 t=0 have=0
  echo "[drpo] waiting up to ${timeout_s}s for $want rollout servers at router $url" >&2
  while [ $t -lt "$timeout_s" ]; do
    # GET /workers with the job's API key; prints the number of healthy workers (0 if unreachable)
    have=$("$PY" -m drpo_megatron.rollout.launch workers "$url" 2>/dev/null || echo 0)
    if [ "$have" -ge "$want" ]; then echo "[drpo] $have/$want rollout servers registered after ${t}s" >&2; return 0; fi
    sleep 10; t=$((t + 10))
  done
  echo "[drpo] ERROR: only $have/$want rollout servers registered with $url after ${timeout_s}s; see $DRPO_LOG_DIR/rollout/*.log (last lines below)" >&2
  tail -n 5 "$DRPO_LOG_DIR"/rollout/*.log >&2 || true
  return 1
}
