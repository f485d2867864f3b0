"""A single-node Slurm on this machine for the tests: Debian's munged, slurmctld and slurmd in the foreground,
configured for localhost without cgroups, every state / log / pid / socket file in a temporary folder; the fixture
holds the three processes and stops exactly those. Skipped, with the reason, where the binaries are absent."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing() -> list[str]:
    paths = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in BINARIES if shutil.which(b, path=paths) is None]


def which(b: str) -> str:
    return shutil.which(b, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def write_conf(d: Path, user: str) -> Path:
    cpus, mem = os.cpu_count() or 1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=sealtest
SlurmctldHost={host}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket
CredType=cred/munge
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName={host} CPUs={cpus} RealMemory={mem - 1024} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    return conf


class Cluster:
    def __init__(self, folder: Path):
        self.dir = folder
        self.procs: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}

    def start(self, timeout: float = 30.0) -> float:
        t0 = time.time()
        d = self.dir
        for sub in ("state", "spool", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        user = os.environ.get("USER") or "root"
        conf = write_conf(d, "root" if os.geteuid() == 0 else user)
        self.env = {"SLURM_CONF": str(conf)}
        env = dict(os.environ, **self.env)
        log = open(d / "daemons.out", "w")
        self.procs.append(subprocess.Popen(
            [which("munged"), "-F", "-f", "--key-file", str(key), "--socket", str(d / "munge.socket"),
             "--pid-file", str(d / "munged.pid"), "--log-file", str(d / "munged.log"),
             "--seed-file", str(d / "munge" / "seed")], stdout=log, stderr=log, env=env))
        self._wait(lambda: (d / "munge.socket").exists(), timeout, "munged")
        self.procs.append(subprocess.Popen([which("slurmctld"), "-D", "-i", "-f", str(conf)], stdout=log, stderr=log,
                                           env=env))
        self.procs.append(subprocess.Popen([which("slurmd"), "-D", "-f", str(conf)], stdout=log, stderr=log, env=env))
        self._wait(self.idle, timeout, "slurmd registering as idle")
        return time.time() - t0

    def idle(self) -> bool:
        out = self.cmd("sinfo", "-h", "-o", "%t")
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

    def cmd(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([which(args[0]) or args[0], *args[1:]], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, **self.env))

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if any(p.poll() is not None for p in self.procs):
                break
            if ok():
                return
            time.sleep(0.2)
        self.stop()
        tail = (self.dir / "daemons.out").read_text()[-2000:]
        for f in ("slurmctld.log", "slurmd.log", "munged.log"):
            if (self.dir / f).exists():
                tail += f"\n--- {f}\n" + (self.dir / f).read_text()[-1500:]
        raise RuntimeError(f"single-node Slurm: {what} did not happen within {timeout:.0f} s:\n{tail}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    gone = missing()
    if gone:
        pytest.skip(f"no Slurm here: {', '.join(gone)} not installed (.ci/run installs slurmctld slurmd "
                    "slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("the single-node Slurm runs slurmd, which needs root")
    c = Cluster(Path(tempfile_dir(tmp_path_factory)))
    try:
        c.seconds = c.start()
    except RuntimeError:
        shutil.rmtree(c.dir, ignore_errors=True)
        raise
    old = {k: os.environ.get(k) for k in c.env}
    os.environ.update(c.env)  # submitit's sbatch / squeue / sacct calls find this cluster
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.dir, ignore_errors=True)  # a failed start quoted its logs in the error already
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tempfile_dir(factory) -> Path:
    # the munge socket path must stay short (unix sockets: 108 bytes): a folder under /tmp, not pytest's deep one
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    d.chmod(0o755)  # munged wants its socket folder reachable by all
    return d
