# Shared by every drpo sbatch script (sourced; rendered scripts embed nothing from here but call it).
# Functions: drpo_env_network, drpo_on_signal, drpo_wait_router.

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

# ---- SIGUSR1 (sent by `--signal=B:USR1@SECONDS` before the time limit) and SIGTERM (preemption,
# scancel): ask the trainer to checkpoint (signal forwarded to the trainer step + a stop file the
# trainer polls) and wait for it to exit; after SIGUSR1 requeue the job, which resumes from
# <output_dir>/checkpoint (train.resume: auto).
DRPO_TRAIN_PID=""
drpo_on_signal() {
  local sig=$1
  echo "[drpo] $(date -u +%FT%TZ) got SIG$sig: requesting checkpoint + exit, then requeue" >&2
  touch "$DRPO_STOP_FILE"
  if [ -n "$DRPO_TRAIN_PID" ]; then kill -USR1 "$DRPO_TRAIN_PID" 2>/dev/null || true; fi
  local waited=0
  while [ -n "$DRPO_TRAIN_PID" ] && kill -0 "$DRPO_TRAIN_PID" 2>/dev/null && [ $waited -lt "$DRPO_CKPT_GRACE_S" ]; do
    sleep 5; waited=$((waited + 5))
  done
  if [ "$sig" = USR1 ]; then
    # time limit ahead: requeue ourselves. SIGTERM (scancel, preemption) only checkpoints: a
    # user's scancel must stay cancelled, and preemption with --requeue is requeued by SLURM.
    scontrol requeue "$SLURM_JOB_ID" && echo "[drpo] requeued $SLURM_JOB_ID" >&2
  fi
  exit 0
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
    have=$(curl -fsS "$url/list_workers" 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d.get("urls", d.get("workers", []))))' 2>/dev/null || echo 0)
    if [ "$have" -ge "$want" ]; then echo "[drpo] $have/$want rollout servers registered after ${t}s" >&2; return 0; fi
    sleep 10; t=$((t + 10))
  done
  echo "[drpo] ERROR: only $have/$want rollout servers registered with $url after ${timeout_s}s; see $DRPO_LOG_DIR/rollout/*.log (last lines below)" >&2
  tail -n 5 "$DRPO_LOG_DIR"/rollout/*.log >&2 || true
  return 1
}
