# shellcheck shell=bash
# Helpers shared by the sbatch templates in slurm/ (sourced, never run directly).
#
#   toolkit_master_port JOB_ID     rendezvous port derived from the job id
#   toolkit_main_ip                first host of the allocation (runs `scontrol show hostnames`)
#   toolkit_procs_per_node         processes to start on THIS node: GPUs of the allocation,
#                                  or $TOOLKIT_CPU CPU processes when the CPU switch is on
#   toolkit_run NODE_CMD ARGS...   run NODE_CMD once per node under srun with the training
#                                  ARGS, forward the USR1 warning as a stop request, and
#                                  requeue the job when training stopped early
#
# Environment read here (all optional):
#   TOOLKIT_CPU=N            CPU switch: N CPU processes per node, adds --cpu (tests, debugging)
#   TRAIN_SCRIPT             training entry point (default launch/train.py)
#   OUTPUT_DIR               run folder (default: the --output-dir in ARGS, else
#                            runs/slurm-$SLURM_JOB_ID: the job id survives requeues)
#   TOOLKIT_MAX_RESTARTS     stop requeueing after this many restarts (default 50)

# 15000 + job_id mod 15000: below the Linux ephemeral range (32768+), distinct for
# jobs on a shared node. Same rule as toolkit.backends.cluster.master_port_for_job().
toolkit_master_port() {
  local id=${1:?job id}
  if [[ $id =~ ^[0-9]+$ ]]; then
    echo $((15000 + 10#$id % 15000))
  else
    python -c 'import sys; from toolkit.cluster import master_port_for_job as p; print(p(sys.argv[1]))' "$id"
  fi
}

toolkit_main_ip() {
  scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM job}" | head -n1
}

# Evaluated on each node (exported into the srun task): the allocation's GPUs there.
toolkit_procs_per_node() {
  local n
  if [[ ${TOOLKIT_CPU:-0} =~ ^[1-9][0-9]*$ ]]; then
    echo "$TOOLKIT_CPU"; return 0
  fi
  if [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[1-9][0-9]*$ ]]; then
    echo "$SLURM_GPUS_ON_NODE"; return 0
  fi
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
    n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    [ "$n" -gt 0 ] && { echo "$n"; return 0; }
  fi
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ "${n:-0}" -gt 0 ]; then echo "$n"; return 0; fi
  echo "toolkit: no GPU in the allocation on $(hostname) (ask for --gres=gpu:N, or set TOOLKIT_CPU=N to run N CPU processes)" >&2
  return 1
}

# Value of --name / --name=VALUE in the given args, or nothing.
_toolkit_arg_value() {
  local name=$1; shift
  while [ $# -gt 0 ]; do
    case $1 in
      "$name") echo "${2:-}"; return 0 ;;
      "$name"=*) echo "${1#*=}"; return 0 ;;
    esac
    shift
  done
  return 1
}

_toolkit_log() { echo "[slurm $(date '+%F %T')] $*"; }

_toolkit_on_signal() {
  local sig=$1
  _toolkit_log "received SIG$sig: asking training to checkpoint at the next step boundary (touch $TOOLKIT_STOP_FILE)"
  touch "$TOOLKIT_STOP_FILE" || _toolkit_log "could not write $TOOLKIT_STOP_FILE"
  if [ "$sig" = USR1 ]; then _TOOLKIT_GOT_USR1=1; else _TOOLKIT_GOT_TERM=1; fi
}

# toolkit_run NODE_CMD TRAIN_ARGS...
# NODE_CMD is a bash script run by `bash -c` on every node (one srun task per node); it
# receives the training arguments as "$@" and sees MAIN_IP, MAIN_PORT, TRAIN_SCRIPT and
# the function toolkit_procs_per_node. Expand SLURM_NODEID inside it, never here.
toolkit_run() {
  local node_cmd=$1; shift
  : "${SLURM_JOB_ID:?toolkit_run must run inside a SLURM job (sbatch)}"
  local restarts=${SLURM_RESTART_COUNT:-0}
  local out_dir
  out_dir=$(_toolkit_arg_value --output-dir "$@") || out_dir=${OUTPUT_DIR:-runs/slurm-$SLURM_JOB_ID}
  mkdir -p "$out_dir"

  local extra=()
  _toolkit_arg_value --output-dir "$@" >/dev/null || extra+=(--output-dir "$out_dir")
  _toolkit_arg_value --resume-from "$@" >/dev/null || extra+=(--resume-from auto)
  # The stop file is how the USR1 warning reaches the training processes on every
  # node: the batch shell alone gets the signal (--signal=B:USR1@...), and sending
  # USR1 down to `accelerate launch` would kill the launcher instead.
  TOOLKIT_STOP_FILE=$(_toolkit_arg_value --stop-file "$@") || {
    TOOLKIT_STOP_FILE=$out_dir/STOP
    extra+=(--stop-file "$TOOLKIT_STOP_FILE")
  }
  export TOOLKIT_STOP_FILE
  rm -f "$TOOLKIT_STOP_FILE"
  if [[ ${TOOLKIT_CPU:-0} =~ ^[1-9][0-9]*$ ]]; then
    export ACCELERATE_USE_CPU=true
    _toolkit_arg_value --cpu "$@" >/dev/null || extra+=(--cpu)
  fi

  : "${MAIN_IP:=$(toolkit_main_ip)}" "${MAIN_PORT:=$(toolkit_master_port "$SLURM_JOB_ID")}"
  export MAIN_IP MAIN_PORT
  export TRAIN_SCRIPT=${TRAIN_SCRIPT:-launch/train.py}
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # the toolkit from this checkout, installed or not
  export -f toolkit_procs_per_node

  _toolkit_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) SLURM_RESTART_COUNT=$restarts on $SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST, batch host $(hostname)"
  _toolkit_log "main process $MAIN_IP:$MAIN_PORT; output dir $out_dir; stop file $TOOLKIT_STOP_FILE"
  _toolkit_log "training: $TRAIN_SCRIPT $* ${extra[*]}"

  _TOOLKIT_GOT_USR1=0 _TOOLKIT_GOT_TERM=0
  local started
  started=$(date +%s)
  trap '_toolkit_on_signal USR1' USR1
  trap '_toolkit_on_signal TERM' TERM

  # One task per node. --cpus-per-task is repeated because srun >= 22.05 no longer
  # inherits it from sbatch (the launcher would be pinned to one core otherwise).
  srun --ntasks-per-node=1 --nodes="$SLURM_JOB_NUM_NODES" --kill-on-bad-exit=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c "$node_cmd" toolkit-node "$@" "${extra[@]}" &
  local pid=$! rc
  # A trapped signal interrupts `wait` (status > 128); wait again until srun is done.
  while :; do
    wait "$pid"; rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  # the traps stay: a late USR1 must not kill this shell (the default action) before it decides

  local finished=0
  if [ -f "$out_dir/metrics.json" ] && [ "$(stat -c %Y "$out_dir/metrics.json")" -ge "$started" ]; then
    finished=1
  fi
  if [ "$finished" = 1 ]; then
    if [ "$rc" -eq 0 ]; then
      _toolkit_log "training finished (metrics in $out_dir/metrics.json)"
    else
      _toolkit_log "training wrote $out_dir/metrics.json but srun exit status is $rc (crash at shutdown?)"
    fi
    return "$rc"
  fi
  if [ "$_TOOLKIT_GOT_TERM" = 1 ]; then
    _toolkit_log "SIGTERM (scancel or preemption): not requeueing myself; srun exit status $rc"
    return "$rc"
  fi
  if [ "$_TOOLKIT_GOT_USR1" = 1 ] || [ -e "$TOOLKIT_STOP_FILE" ] || [ "$rc" -eq 75 ]; then
    if [ "$restarts" -ge "${TOOLKIT_MAX_RESTARTS:-50}" ]; then
      _toolkit_log "stopped early but SLURM_RESTART_COUNT=$restarts reached TOOLKIT_MAX_RESTARTS; not requeueing"
      return 75
    fi
    _toolkit_log "training stopped at a checkpoint (srun exit status $rc); requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
      return 0
    fi
    _toolkit_log "scontrol requeue failed; resubmit by hand, training resumes from $out_dir/checkpoints"
    return 75
  fi
  _toolkit_log "training failed (srun exit status $rc); not requeueing"
  [ "$rc" -eq 0 ] && rc=1   # exit 0 without metrics.json is a failure too
  return "$rc"
}
