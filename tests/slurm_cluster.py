"""A throwaway SLURM cluster on this machine (as root, no systemd/cgroups; Debian 12 slurm-wlm 22.05).

Two slurmd daemons act as nodes n1 and n2 (both this host), so 1-node and 2-node jobs run on one machine.
Daemons this class starts are stopped by the PIDs in their pid files, never by name.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
MUNGE_PID = Path("/run/munge/munged.pid")


def ensure_installed() -> str | None:
    """Install SLURM + munge from apt if needed; returns a skip reason, or None when ready."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed: {(r.stderr or r.stdout)[-500:]}"
    return None


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class LocalSlurm:
    def __init__(self, root: Path, nodes=("n1", "n2"), cpus_per_node: int = 2):
        self.root = Path(root).resolve()  # absolute: the daemons chdir to /
        self.nodes = list(nodes)
        self.cpus = cpus_per_node
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.started_munge = False

    # --- lifecycle -----------------------------------------------------------------------------------------
    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        node_lines = [f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={17001 + i} "
                      f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN" for i, n in enumerate(self.nodes)]
        self.conf.write_text("\n".join([
            "ClusterName=local", f"SlurmctldHost={self.host}", "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmUser=root", "SlurmdUser=root", "ReturnToService=2", "MpiDefault=none",
            "MinJobAge=600",  # keep finished jobs visible to `scontrol show job`
            *node_lines,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))

    def start_munge(self) -> None:
        if _alive(_pid(MUNGE_PID)):
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "munged"], check=True, timeout=30)
        self.started_munge = True
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged started but `munge -n | unmunge` fails")

    def start(self, timeout: float = 60) -> None:
        self.write_conf()
        self.start_munge()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        for n in self.nodes:
            subprocess.run(["slurmd", "-N", n, "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout}s: {out!r}\n{self.logs()}")

    def stop(self) -> None:
        pids = [_pid(self.root / f"slurmd-{n}.pid") for n in self.nodes] + [_pid(self.root / "slurmctld.pid")]
        if self.started_munge:
            pids.append(_pid(MUNGE_PID))
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 15
        for pid in pids:
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    # --- helpers -------------------------------------------------------------------------------------------
    def run(self, cmd, check: bool = True, env: dict | None = None, timeout: float = 300, **kw):
        r = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{cmd} exited {r.returncode}: {r.stderr[-2000:]}")
        return r

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run(["scontrol", "show", "job", job_id], check=False).stdout
        for tok in out.split():
            if tok.startswith(field + "="):
                return tok.split("=", 1)[1]
        return ""

    def wait_state(self, job_id: str, states, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.job_field(job_id, "JobState")
            if s in states:
                return s
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s (now {s})")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {f.name}\n" + f.read_text()[-1500:])
        return "\n".join(parts)
