#!/usr/bin/env bash
# A one-node SLURM on this machine (Debian/Ubuntu, root): what the SLURM tests run against, and a way to try
# hydra/launcher=slurm and train.sbatch without a cluster. From the recipe in ../shared/slurm.md (tested on Debian 12).
# Start a single-node SLURM cluster on localhost (Debian 12, root, no systemd).
# WITH_DBD=1 also starts MariaDB + slurmdbd so that `sacct` works (submitit uses sacct for job.state).
# SLURM_CI_CPUS=N declares N CPUs (more than the real 2) so N one-CPU jobs run at once.
set -euo pipefail
WITH_DBD=${WITH_DBD:-0}
export DEBIAN_FRONTEND=noninteractive

# 1. packages (idempotent)
pkgs="slurmctld slurmd slurm-client munge"
[ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  apt-get install -y --no-install-recommends $missing \
    || { apt-get update && apt-get install -y --no-install-recommends $missing; }
fi

# 2. munge (postinst normally creates the key already)
if [ ! -s /etc/munge/munge.key ]; then
  runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged          # forks; pid in /run/munge/munged.pid
  for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null

# 3. optional accounting: MariaDB + slurmdbd
if [ "$WITH_DBD" = 1 ]; then
  install -d -o mysql -g root -m 0755 /run/mysqld
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 >/var/log/mariadbd.out 2>&1 < /dev/null &
    for i in $(seq 100); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmci';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  install -d -m 0755 /var/log/slurm
  cat > /etc/slurm/slurmdbd.conf <<DBD
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmci
StorageLoc=slurm_acct_db
DBD
  chmod 0600 /etc/slurm/slurmdbd.conf
  slurmdbd                                       # forks; pid in /run/slurmdbd.pid
  for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.1; done
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi

# 4. slurm.conf from what slurmd sees
H=$(hostname -s)
eval "$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=')"
EXTRA=""
if [ -n "${SLURM_CI_CPUS:-}" ]; then
  CPUs=$SLURM_CI_CPUS; SocketsPerBoard=1; CoresPerSocket=$SLURM_CI_CPUS; ThreadsPerCore=1
  EXTRA="SlurmdParameters=config_overrides"
fi
install -d -m 0755 /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=localci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
${ACCT}
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MailProg=/bin/true
${EXTRA}
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${CPUs} SocketsPerBoard=${SocketsPerBoard} CoresPerSocket=${CoresPerSocket} ThreadsPerCore=${ThreadsPerCore} RealMemory=${RealMemory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# 5. daemons (both fork into the background and write their pid files)
slurmctld
slurmd
for i in $(seq 100); do
  st=$(sinfo -h -n "$H" -o %T 2>/dev/null || true)
  [ "$st" = idle ] && break; sleep 0.1
done
sinfo
[ "$st" = idle ] || { echo "node not idle: $st" >&2; tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2; exit 1; }
