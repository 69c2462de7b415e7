"""A small real cluster on this machine for the cluster tests: "nodes" with their own network stack, hostname and
(where asked) private folders, and a real Slurm (munge + slurmctld + one slurmd per node) over them.

* Each node is a network namespace (``ip netns``) with one end of a veth pair (two nodes) and an address in
  192.0.2.0/24 (TEST-NET-1) that exists only inside these namespaces, plus a UTS + mount namespace (``unshare``)
  holding its hostname and an /etc/hosts that names every node (gloo and the c10d rendezvous resolve hostnames).
  Commands run on a node through ``nsenter``. Nothing is reachable from a node but the other nodes and its
  loopback; the namespaces' names are unique per test run.
* ``SlurmCluster`` starts munged (its own key and socket), slurmctld on the first node and a slurmd on every node
  from a generated slurm.conf in a temp folder; client commands (sbatch, scontrol) run on the first node.
* Teardown kills every process still inside the nodes' network namespaces (workers orphaned by a killed launcher
  included), then removes the namespaces, whatever the test's outcome.

Needs root, ``ip``/``unshare``/``nsenter`` and (for Slurm) Debian's ``slurm-wlm`` and ``munge``. As root or in CI a
cluster that cannot be set up FAILS the test with the reason; elsewhere the test is skipped (``require_root``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

SUBNET = "192.0.2"  # TEST-NET-1 (RFC 5737): never routed, only ever assigned inside the namespaces made here


def require_root(what: str) -> None:
    """Skip outside root/CI (a developer's laptop); as root or with CI=true a missing capability must fail."""
    if os.geteuid() != 0 and os.environ.get("CI", "").lower() not in ("1", "true"):
        pytest.skip(f"{what} needs root (network namespaces, Slurm daemons)")


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"cluster setup: `{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def wait_until(cond: Callable[[], object], what: str, timeout: float, poll: float = 0.2,
               alive: Callable[[], bool] | None = None) -> None:
    """Poll ``cond`` until true; fail after ``timeout`` seconds or as soon as ``alive()`` turns false."""
    end = time.monotonic() + timeout
    while not cond():
        if alive is not None and not alive():
            raise AssertionError(f"gave up waiting for {what}: the process it depends on has exited")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


class Node:
    """One "machine": a network namespace, a hostname, an address; ``argv()`` runs a command on it."""

    def __init__(self, netns: str, hostname: str, addr: str, hosts_file: Path, link: str):
        self.netns, self.hostname, self.addr, self.link = netns, hostname, addr, link
        # A UTS + mount namespace (its hostname, its /etc/hosts) entered with the network namespace; the holder
        # process keeps them alive. /sys stays the host's (slurmd reads cgroups there).
        script = (f"hostname {hostname} && mount --bind {hosts_file} /etc/hosts && echo ready && "
                  "exec sleep 1000000")
        self.holder = subprocess.Popen(["unshare", "--uts", "--mount", "--propagation", "private", "nsenter",
                                        f"--net=/run/netns/{netns}", "sh", "-c", script],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            raise AssertionError(f"cluster setup: node {hostname} did not start: {self.holder.stderr.read()}")
        self.net_ns_id = os.readlink(f"/proc/{self.holder.pid}/ns/net")

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-u", "-m", "--", *cmd]

    def run(self, *cmd: str, env: dict[str, str] | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*cmd), capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"on {self.hostname}: `{' '.join(cmd)}` failed ({proc.returncode}): "
                                 f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    def popen(self, *cmd: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        f = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        return subprocess.Popen(self.argv(*cmd), stdout=f, stderr=subprocess.STDOUT, env=env)

    def set_link(self, up: bool) -> None:
        """Plug or unplug this node's network link: down, every packet to and from it is dropped and no connection
        is closed (a partition, or a node that froze), unlike a killed process whose connections close at once."""
        _run(["ip", "-n", self.netns, "link", "set", self.link, "up" if up else "down"])

    def private_folder(self, path: Path, backing: Path) -> None:
        """Make ``path`` node-local on this node: its own empty folder (``backing``) mounted over it."""
        backing.mkdir(parents=True, exist_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        self.run("mount", "--bind", str(backing), str(path))

    def processes(self) -> list[psutil.Process]:
        """Every process inside this node's network namespace (the holder excluded)."""
        out = []
        for p in psutil.process_iter():
            if p.pid == self.holder.pid:
                continue
            try:
                if os.readlink(f"/proc/{p.pid}/ns/net") == self.net_ns_id:
                    out.append(p)
            except OSError:
                continue
        return out

    def kill_all(self) -> None:
        """kill -9 of everything running on this node, Slurm's daemons included (the namespace stays)."""
        for p in self.processes():
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def close(self) -> None:
        self.kill_all()
        self.holder.kill()
        self.holder.wait()


class Cluster:
    """Two nodes joined by a veth pair (``nodes[0]`` at .1, ``nodes[1]`` at .2); a context manager."""

    def __init__(self, tmp: Path, names: tuple[str, str] = ("node1", "node2")):
        for tool in ("ip", "unshare", "nsenter"):
            if not shutil.which(tool):
                raise AssertionError(f"cluster setup: `{tool}` is not installed (iproute2/util-linux)")
        tag = uuid.uuid4().hex[:6]
        self.netns = [f"hgt{tag}{i}" for i in range(2)]
        self.nodes: list[Node] = []
        self.tmp = tmp
        hosts = tmp / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{SUBNET}.{i + 1} {n}\n" for i, n in enumerate(names)))
        try:
            for ns in self.netns:
                _run(["ip", "netns", "add", ns])
            veth = [f"hgv{tag}{i}" for i in range(2)]
            _run(["ip", "link", "add", veth[0], "netns", self.netns[0], "type", "veth", "peer", "name", veth[1],
                  "netns", self.netns[1]])
            for i, ns in enumerate(self.netns):
                _run(["ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", veth[i]])
                _run(["ip", "-n", ns, "link", "set", veth[i], "up"])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            self.nodes = [Node(ns, name, f"{SUBNET}.{i + 1}", hosts, veth[i]) for i, (ns, name) in
                          enumerate(zip(self.netns, names, strict=True))]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


SLURM_CONF = """\
ClusterName=hgtest
SlurmctldHost={head}({head_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge.sock,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
MailProg=/bin/true
# linuxproc tracks the workers torchrun starts in sessions of their own (pgid would lose them).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld (on ``cluster.nodes[0]``) + a slurmd per node, from a generated slurm.conf.

    Each node has this machine's 2 cores (the nodes share them) and no GPU: the tests train on the CPU.
    """

    def __init__(self, cluster: Cluster, root: Path):
        for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
            if not shutil.which(tool):
                raise AssertionError(f"cluster setup: `{tool}` is not installed: apt-get install -y slurm-wlm munge")
        self.cluster, self.root = cluster, root
        self.procs: list[subprocess.Popen] = []
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        (root / "state").mkdir()
        for node in cluster.nodes:
            (root / "spool" / node.hostname).mkdir(parents=True)
        from tests.conftest import free_port

        head = cluster.nodes[0]
        nodes = "\n".join(f"NodeName={n.hostname} NodeAddr={n.addr} CPUs=2 State=UNKNOWN"
                          for n in cluster.nodes)
        self.conf = root / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(head=head.hostname, head_addr=head.addr, root=root, nodes=nodes,
                                               ctld_port=free_port(), slurmd_port=free_port()))
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        try:
            self._start(["munged", "-F", "--force", f"--socket={root}/munge.sock", f"--key-file={key}",
                         f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed",
                         f"--log-file={root}/munged.log"], "munged")
            wait_until(lambda: (root / "munge.sock").exists(), "munged's socket", 20)
            self.ctld_started = time.time()
            self._start(head.argv("slurmctld", "-D", "-f", str(self.conf)), "slurmctld")
            wait_until(lambda: head.run("scontrol", "ping", env=self.env, check=False).returncode == 0,
                       "slurmctld to answer", 30)
            for node in cluster.nodes:
                self._start(node.argv("slurmd", "-D", "-f", str(self.conf)), f"slurmd.{node.hostname}")
            wait_until(lambda: self.node_states() == ["idle"] * len(cluster.nodes),
                       "every slurmd to register (idle)", 60, poll=0.5)
        except BaseException:
            self.close()
            raise

    def _start(self, argv: list[str], name: str) -> None:
        f = open(self.root / f"{name}.out", "ab")  # noqa: SIM115
        self.procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self.env))

    def node_states(self) -> list[str]:
        out = self.cluster.nodes[0].run("sinfo", "-h", "-N", "-o", "%T", env=self.env, check=False).stdout
        return out.split()

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.cluster.nodes[0].run("scontrol", *args, env=self.env, check=check).stdout

    def sbatch(self, *args: str, env: dict[str, str]) -> int:
        """Submit from the first node (the login node); returns the job id."""
        out = self.cluster.nodes[0].run("sbatch", "--parsable", *args, env={**env, "SLURM_CONF": str(self.conf)})
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, RunTime, ...)."""
        text = self.scontrol("show", "job", "-o", str(job_id))
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}\n"
                       for p in sorted(self.root.glob("*.log")))

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
