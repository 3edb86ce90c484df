#!/usr/bin/env bash
# Stop the daemons started by slurm-up.sh, by the PIDs in their pid files (reverse order).
stop() {  # $1 = pid file
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do   # a killed daemon may linger as a zombie (PID 1 here reaps late): check the state
    st=$(awk '/^State:/{print $2}' /proc/"$pid"/status 2>/dev/null || true)
    [ -z "$st" ] || [ "$st" = Z ] && break; sleep 0.1
  done
}
stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/slurmdbd.pid
stop /run/mysqld/mysqld.pid
stop /run/munge/munged.pid
