#!/usr/bin/env bash
# Throwaway SLURM cluster on localhost for the tests (Debian/Ubuntu packages, needs root).
#
#   bash tests/slurm_cluster.sh up       install slurmctld/slurmd/slurm-client/munge if missing,
#                                        start munged + slurmctld + one slurmd per fake node,
#                                        wait until every node is idle
#   bash tests/slurm_cluster.sh down     cancel all jobs, stop the daemons this script started
#                                        (by their pid files), undo the /etc/hosts entries
#   bash tests/slurm_cluster.sh status   sinfo + squeue
#
# Then use it with:   export SLURM_CONF=$SLURM_BASE/slurm.conf   (printed by `up`)
# The configuration lives under $SLURM_BASE, so an existing /etc/slurm/slurm.conf is left alone,
# and the daemons use their own ports (slurmctld 16817, slurmd 17001..), so a real SLURM on the
# same machine is not disturbed.
#
# Environment:
#   SLURM_BASE=/tmp/toolkit-slurm   state, spool, logs, pid files, slurm.conf
#   SLURM_NODES=2                   fake nodes n1..nN, one slurmd each (all on this host)
#   SLURM_CPUS=2                    CPUs advertised per node (config_overrides: may exceed the hardware)
#
# Exit status of `up`: 0 ready, 2 cannot run here (not root, no apt-get, packages unavailable:
# a reason on stderr; the tests skip, or fail when CI=true), 1 daemons did not come up (logs printed).
#
# Settings that matter for the tests (learnt the hard way, see also docs/slurm.md):
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none   no cgroups / systemd needed
#   AuthInfo=cred_expire=10    a requeued job may start again after ~11 s instead of ~121 s
#   MinJobAge=4                `sbatch --wait` polls every 2 s (it backs off up to 32 s when
#                              MinJobAge >= 5); job records go a few seconds after the end
set -uo pipefail
ACTION=${1:-up}
BASE=${SLURM_BASE:-/tmp/toolkit-slurm}
NNODES=${SLURM_NODES:-2}
CPUS=${SLURM_CPUS:-2}
CONF=$BASE/slurm.conf
CTLD_PORT=16817
NODE_PORT0=17001
export SLURM_CONF=$CONF

log() { echo "slurm_cluster: $*"; }
cannot() { echo "slurm_cluster: cannot start a local SLURM cluster: $*" >&2; exit 2; }

stop_pid() {  # stop_pid PIDFILE: TERM, wait up to 10 s, then KILL
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null)
  if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  if [ -f "$CONF" ] && command -v squeue >/dev/null; then
    local jobs
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel --full $jobs 2>/dev/null || true   # otherwise job steps outlive slurmd
      for _ in $(seq 100); do [ -z "$(timeout 5 squeue -h -t R,CG 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  local f
  for f in "$BASE"/run/slurmd-*.pid "$BASE"/run/slurmctld.pid "$BASE"/run/munge/munged.pid; do stop_pid "$f"; done
  if [ -f "$BASE/hosts.added" ]; then
    grep -v '# toolkit-slurm$' /etc/hosts > "$BASE/hosts.tmp" || true
    cat "$BASE/hosts.tmp" > /etc/hosts
    rm -f "$BASE/hosts.added" "$BASE/hosts.tmp"
  fi
  log "down (logs kept in $BASE/log)"
}

case $ACTION in
  down) down; exit 0 ;;
  status) sinfo; squeue; exit 0 ;;
  up) ;;
  *) echo "usage: $0 up|down|status" >&2; exit 64 ;;
esac

[ "$(id -u)" -eq 0 ] || cannot "needs root (installs packages, starts daemons, edits /etc/hosts); running as $(id -un)"
[ -f "$BASE/run/slurmctld.pid" ] && down   # restart cleanly if a previous run left it up
T0=$(date +%s.%N)

# 1. packages (~3.5 MB download, a few seconds)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || cannot "slurmctld/slurmd/sbatch/munged missing and no apt-get to install them"
  log "installing slurmctld slurmd slurm-client munge"
  apt-get update -qq >/dev/null 2>&1 || cannot "apt-get update failed (no network to the package mirror?)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null 2>&1 || cannot "apt-get install slurmctld slurmd slurm-client munge failed"
fi

mkdir -p "$BASE"/run "$BASE"/log
# 2. munge: reuse a working munged (e.g. started by the package's init script), else start one
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge "$BASE"/run/munge
  runuser -u munge -- munged --pid-file="$BASE/run/munge/munged.pid" || { echo "munged failed to start" >&2; exit 1; }
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || { echo "munge does not work" >&2; exit 1; }

# 3. slurm.conf
H=$(hostname -s)
MEM=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
MEM=$(( MEM * 9 / 10 / NNODES ))
rm -rf "$BASE"/state "$BASE"/spool "$BASE"/log/*
mkdir -p "$BASE"/state "$BASE"/spool
cat > "$CONF" <<EOF
# generated by tests/slurm_cluster.sh
ClusterName=toolkitci
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
AuthInfo=cred_expire=10
MinJobAge=4
KillWait=5
MailProg=/bin/true
NodeName=n[1-$NNODES] NodeHostname=$H NodeAddr=127.0.0.1 Port=[$NODE_PORT0-$((NODE_PORT0 + NNODES - 1))] CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# job scripts resolve `scontrol show hostnames` output (the main process address is n1)
if ! getent hosts n1 >/dev/null; then
  echo "127.0.0.1 $(seq -f 'n%g' -s ' ' 1 "$NNODES") # toolkit-slurm" >> /etc/hosts
  touch "$BASE/hosts.added"
fi

# 4. daemons (they fork and write their pid files)
slurmctld -f "$CONF" || { echo "slurmctld failed to start" >&2; tail -n 30 "$BASE/log/slurmctld.log" >&2; exit 1; }
for i in $(seq 1 "$NNODES"); do
  mkdir -p "$BASE/spool/n$i"
  slurmd -f "$CONF" -N "n$i" || { echo "slurmd n$i failed to start" >&2; tail -n 30 "$BASE/log/slurmd-n$i.log" >&2; exit 1; }
done

# 5. wait until all nodes are idle
for _ in $(seq 300); do
  [ "$(sinfo -h -o '%T %D' 2>/dev/null)" = "idle $NNODES" ] && break; sleep 0.2
done
if [ "$(sinfo -h -o '%T %D' 2>/dev/null)" != "idle $NNODES" ]; then
  echo "slurm_cluster: nodes not idle after 60 s:" >&2; sinfo >&2
  tail -n 20 "$BASE"/log/*.log >&2
  exit 1
fi
sinfo
log "up in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $T0}") s: nodes n[1-$NNODES], $CPUS CPUs each"
echo "export SLURM_CONF=$CONF"
