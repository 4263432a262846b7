#!/usr/bin/env bash
# Starts a real one-node Slurm for the tests (Debian's slurm-wlm and munge;
# root, no systemd): munged, slurmctld and slurmd with a minimal slurm.conf
# under the cache directory. Idempotent: a running cluster is reused.
# Prints the slurm.conf path on stdout (use it as SLURM_CONF); exits 1 with a
# line on stderr where the daemons cannot start.
set -euo pipefail
CACHE="${TORCHRUN_RS_CACHE:-$HOME/.cache/torchrun-rs}"
DIR="$CACHE/slurm"
CONF="$DIR/slurm.conf"
say() { echo "slurm-up: $*" >&2; }
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "slurm-wlm and munge are not installed (apt-get install slurm-wlm munge, as root)"
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >&2; }
fi
if [ "$(id -u)" != 0 ]; then
  say "starting munged, slurmctld and slurmd needs root"
  exit 1
fi
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /run/munge
export SLURM_CONF="$CONF"
if [ -f "$CONF" ] && scontrol ping 2>/dev/null | grep -q "is UP" \
   && sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
  echo "$CONF"
  exit 0
fi
# munge: a key of our own only if the machine has none (an existing key
# and the package's directories are left as they are); the daemon as root.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
fi
chown munge:munge /run/munge 2>/dev/null || true
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- munged --force 2>/dev/null || munged --force
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n >/dev/null 2>&1 || { say "munged did not start"; exit 1; }
# Only the daemons of this cluster (started with this slurm.conf), never a
# Slurm the machine runs for itself.
pkill -f -- "slurmctld -f $CONF" 2>/dev/null || true
pkill -f -- "slurmd -f $CONF" 2>/dev/null || true
HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM="$(awk '/MemTotal/{print int($2/1024) - 512}' /proc/meminfo)"
cat > "$CONF" <<CONF
ClusterName=torchrun-rs-tests
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
KillWait=10
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
slurmctld -f "$CONF" >&2 || { say "slurmctld did not start (see $DIR/log/slurmctld.log)"; exit 1; }
slurmd -f "$CONF" >&2 || { say "slurmd did not start (see $DIR/log/slurmd.log)"; exit 1; }
for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
    echo "$CONF"
    exit 0
  fi
  sleep 0.2
done
say "the node did not come up (see $DIR/log)"
exit 1
