"""Clusters for real, on this machine: two namespaced "nodes" (tests/cluster.py) with their own network stack and
hostname, and a real Slurm over them (munge, slurmctld, a slurmd per node).

Every training run here has the same configuration (the tiny model of test_checkpoint_e2e, 150 steps of 256
tokens on two processes in total, a checkpoint every 20 steps) so that one uninterrupted run, the reference,
answers for all of them: a 2-node run through ``accelerate launch`` and through torchrun, a run whose node is
killed (twice: once it comes back, once it does not), and a Slurm job that is preempted and then reaches its
time limit. On the CPU in fp32 they must all produce the reference's losses bit for bit: the data order is a
function of the global position and the gradient all-reduce sums the same two ranks in the same order.
A last run has its node cut off from the network mid-run (no losses compared: it is how the survivor ends that
counts).

The reference itself is the shipped one-node sbatch (scripts/slurm/train.sbatch) running uninterrupted on one
node with two processes; the multi-node job is the shipped scripts/slurm/train_multinode.sbatch. Both get CPU
settings through the environment and sbatch options (not copies of the scripts).

Trackers stay at their defaults (TensorBoard on): a requeued Slurm job must still be one TensorBoard run.
HellaSwag is off (not under test; its scoring would only slow the runs).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from tests.cluster import Cluster, Node, SlurmCluster, require_root, wait_until
from tests.conftest import REPO, free_port, train_losses

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MAX_STEPS, CHECKPOINT_STEPS = 150, 20
CONFIG = {"preset": "quickstart", "n_layer": 1, "n_embd": 32, "n_head": 2, "total_batch_size": 256,
          "per_device_train_batch_size": 2, "seq_len": 64, "hellaswag": "false", "val_batches": 1,
          "sample_max_new_tokens": 0, "logging_steps": 1, "eval_steps": 0, "max_steps": MAX_STEPS,
          "checkpoint_steps": CHECKPOINT_STEPS}
TRAIN_ARGS = [x for k, v in CONFIG.items() for x in (f"--{k}", str(v))]
SBATCH_DIR = REPO / "scripts" / "slurm"


def worker_env(**extra: str) -> dict[str, str]:
    """A CPU user's environment: gloo processes, this checkout importable, the venv's launchers on PATH."""
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", **extra}


def logged_steps(out: Path) -> list[int]:
    try:
        return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def latest_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoints" / "latest" / "manifest.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def assert_each_step_once_with_resume_markers(out: Path, resumes: int) -> None:
    """metrics.jsonl holds every step once, in order; each restart is a resume line at the step it continued from."""
    rows = metrics_rows(out)
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, MAX_STEPS + 1)), "a step is missing or was logged twice"
    markers = [r for r in rows if r.get("event") == "resume"]
    assert len(markers) == resumes, markers
    for m in markers:  # the line before a resume marker is the step it resumed from
        before = [r for r in rows[:rows.index(m)] if "train/loss" in r]
        assert before and before[-1]["step"] == m["step"], m


def log_time(line: str) -> datetime:
    return datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """Two nodes and a Slurm cluster over them, for the whole module; everything is torn down at the end."""
    require_root("the cluster tests")
    root = tmp_path_factory.mktemp("cluster")
    with Cluster(root) as cluster:
        s = SlurmCluster(cluster, root / "slurm")
        try:
            yield s
        finally:
            s.close()


@pytest.fixture(scope="module")
def reference(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The uninterrupted run: scripts/slurm/train.sbatch on one node, two processes (torchrun --standalone)."""
    work = tmp_path_factory.mktemp("reference")
    out = work / "run"
    job = slurm.sbatch("-D", str(work), "-o", str(work / "job.out"), "--time=10", str(SBATCH_DIR / "train.sbatch"),
                       *TRAIN_ARGS, env=worker_env(OUTPUT_DIR=str(out), NPROC_PER_NODE="2"))
    wait_until(lambda: slurm.job(job)["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"),
               "the one-node reference job", 300, poll=0.5)
    info = slurm.job(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, (work / "job.out").read_text()[-3000:])
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return losses


def torchrun_on(node: Node, head: Node, port: int, out: Path, log: Path, *extra: str,
                train_extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """One node's torchrun (launcher flags ``extra``) of a 2-node x 1-process run meeting at a c10d rendezvous on
    ``head``."""
    return node.popen(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                      "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{head.addr}:{port}", "--rdzv_id", out.name,
                      *extra, "-m", "hf_gpt2_train", "train", "--output_dir", str(out), *TRAIN_ARGS, *train_extra,
                      log=log, env=worker_env())


# ------------------------------------------------------------------------------------------------ tests
def test_two_nodes_through_accelerate_launch_train_exactly_like_one_node(slurm: SlurmCluster, reference,
                                                                         tmp_path: Path) -> None:
    """accelerate launch with the multi_node profile, filled by flags, on each of two nodes (1 process each, c10d
    rendezvous on the first): the losses equal the one-node two-process run's, bit for bit. Stopped by SIGTERM
    after step 40 (the launchers forward it): `latest` holds both ranks' RNG files in the one shared folder."""
    n1, n2 = slurm.cluster.nodes
    out, port = tmp_path / "run", free_port()
    procs = [node.popen(sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(REPO / "accelerate_configs" / "multi_node.yaml"), "--num_processes", "2",
                        "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", n1.addr,
                        "--main_process_port", str(port), "--mixed_precision", "no", "-m", "hf_gpt2_train", "train",
                        "--output_dir", str(out), *TRAIN_ARGS, log=tmp_path / f"{node.hostname}.log",
                        env=worker_env())
             for rank, node in enumerate((n1, n2))]
    try:
        wait_until(lambda: len(logged_steps(out)) >= 40, "40 logged steps", 240, alive=lambda: procs[0].poll() is None)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
    train_log = (out / "train.log").read_text()
    stop = re.search(r"stopped by signal at step (\d+); saved 'latest'", train_log)
    assert stop, train_log[-3000:]
    stopped_at = int(stop.group(1))
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, stopped_at + 1))
    assert losses == {s: reference[s] for s in losses}  # bitwise
    latest = out / "checkpoints" / "latest"
    assert latest_step(out) == stopped_at
    assert (latest / "random_states_0.pkl").exists() and (latest / "random_states_1.pkl").exists()


def test_node_local_output_dir_is_refused_at_start_on_every_node(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Each node with its own folder at the --output_dir path (a node-local disk): every node prints one line
    naming the fix, the workers exit 2 before writing anything, no launcher hangs."""
    n1, n2 = slurm.cluster.nodes
    out, port = tmp_path / "run", free_port()
    n2.private_folder(out, tmp_path / "node2-local-disk")
    t0 = time.monotonic()
    procs = [torchrun_on(node, n1, port, out, tmp_path / f"{node.hostname}.log") for node in (n1, n2)]
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    elapsed = time.monotonic() - t0
    assert all(c != 0 for c in codes), codes
    for node in (n1, n2):
        log = (tmp_path / f"{node.hostname}.log").read_text()
        ours = [line for line in log.splitlines() if "hf-gpt2-train: error:" in line]
        assert len(ours) == 1, log[-3000:]
        assert f"--output_dir {out} is not shared: node(s) node2 do not see" in ours[0], ours[0]
        assert "filesystem all nodes mount" in ours[0]
        assert "exitcode  : 2" in log or "exitcode: 2" in log, log[-3000:]  # torchrun's report of our exit code
        assert not re.search(r"\[rank\d\]: Traceback", log), log[-3000:]  # no traceback from our workers
    assert sorted(p.name for p in out.iterdir()) == []  # node1's folder: nothing written (the marker is gone)
    assert not any((tmp_path / "node2-local-disk").iterdir())
    print(f"node-local refusal: {elapsed:.1f}s from launch to both launchers' exit")


def test_a_lost_node_is_recovered_and_one_that_stays_away_ends_the_run(slurm: SlurmCluster, reference,
                                                                      tmp_path: Path) -> None:
    """torchrun on two nodes with --max_restarts 2, --resume_from_checkpoint auto.

    1. kill -9 of node2's worker at a random step: both agents restart their workers, which resume from `latest`
       (at most checkpoint_steps steps recomputed).
    2. Later node2 dies for good (its torchrun killed too): node1's worker stops with one line (exit 6), its agent
       waits for node2 in the rendezvous and ends the run after join_timeout (20 s here, 600 by default).
    3. Both nodes launched again (an operator, or Slurm's requeue): the run finishes, exit 0, with every step
       logged once (a resume line at each restart) and the reference's losses, bit for bit.
    """
    n1, n2 = slurm.cluster.nodes
    out, port = tmp_path / "run", free_port()

    def launch(tag: str) -> list[subprocess.Popen]:
        return [torchrun_on(node, n1, port, out, tmp_path / f"{node.hostname}-{tag}.log", "--max_restarts", "2",
                            "--rdzv_conf", "join_timeout=20", train_extra=("--resume_from_checkpoint", "auto"))
                for node in (n1, n2)]

    procs = launch("a")
    try:
        kill_at = random.Random().randint(25, 70)
        print(f"node2's worker is killed at step {kill_at}")
        wait_until(lambda: len(logged_steps(out)) >= kill_at, f"step {kill_at}", 240,
                   alive=lambda: procs[0].poll() is None)
        workers = [p for p in n2.processes() if "hf_gpt2_train" in " ".join(p.cmdline())
                   and "torch.distributed.run" not in " ".join(p.cmdline())]
        assert len(workers) == 1, workers
        trained_before = max(logged_steps(out))
        workers[0].kill()
        train_log = out / "train.log"
        wait_until(lambda: "resumed from" in train_log.read_text(), "the restarted workers to resume", 180,
                   alive=lambda: procs[0].poll() is None)
        resumed = int(re.search(r"resumed from \S+ \(step (\d+)", train_log.read_text()).group(1))
        trained_before = max(trained_before, *(int(m) for m in re.findall(
            r"step +(\d+)/", train_log.read_text().split("resumed from")[0])))
        assert trained_before - CHECKPOINT_STEPS <= resumed <= trained_before, (resumed, trained_before)

        wait_until(lambda: len(logged_steps(out)) >= resumed + 15, "training after the restart", 240,
                   alive=lambda: procs[0].poll() is None)
        for p in [*psutil.Process(procs[1].pid).children(recursive=True), psutil.Process(procs[1].pid)]:
            p.kill()  # node2 is gone: its torchrun and worker, kill -9 (its slurmd stays for the next test)
        t0 = time.monotonic()
        code = procs[0].wait(timeout=20 + 100)
        survivor_s = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
    log1 = (tmp_path / "node1-a.log").read_text()
    assert code != 0
    assert "hf-gpt2-train: training stopped: lost contact with another process of this run" in log1, log1[-3000:]
    assert "RendezvousTimeoutError" in log1, log1[-3000:]
    assert survivor_s < 20 + 60, survivor_s  # join_timeout plus the worker's stop and the agent's restart
    print(f"killed at step {kill_at}: resumed from step {resumed} ({trained_before - resumed} steps recomputed); "
          f"node2 lost for good: node1 ended after {survivor_s:.1f}s")

    procs = launch("b")
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0], (tmp_path / "node1-b.log").read_text()[-3000:]
    assert_each_step_once_with_resume_markers(out, resumes=2)
    assert train_losses(out) == reference
    assert latest_step(out) == MAX_STEPS and (out / "checkpoints" / "final" / "manifest.json").exists()


def workers(node: Node) -> list[psutil.Process]:
    """The training processes on ``node`` (started by a torchrun: they carry LOCAL_RANK)."""
    out = []
    for p in node.processes():
        try:
            if "hf_gpt2_train" in " ".join(p.cmdline()) and "LOCAL_RANK" in p.environ():
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_slurm_job_at_its_time_limit_then_preempted_requeues_and_finishes(slurm: SlurmCluster, reference,
                                                                         tmp_path: Path) -> None:
    """scripts/slurm/train_multinode.sbatch on both nodes (1 CPU process each), submitted with --time=1 and a 5 s
    signal lead: Slurm checks time limits every 30 s, so the signal comes 25-55 s into a run, and the time-limit
    kill at least 30 s after it.

    Run 1 trains until the time-limit signal: the script stops the training (`latest` saved within the lead), sees
    no `final` and requeues the job itself. So that the signal finds it still training, whatever the phase of
    Slurm's 30 s check, the workers are paused (SIGSTOP) after step 40 and continued when the script reports the
    signal: a long step, as far as the run can tell. Run 2: resumes, and is preempted with `scontrol requeue` after
    its next checkpoint: every process gets SIGTERM, the workers save `latest`, Slurm requeues the job. Run 3 (its
    limit raised, as an operator would): resumes and finishes. Losses equal the uninterrupted run's, every step is
    logged once, TensorBoard has one run."""
    out, work = tmp_path / "run", tmp_path
    job_log = work / "job.out"
    job = slurm.sbatch("-D", str(work), "-o", str(job_log), "--time=1", "--signal=B:TERM@5",
                       str(SBATCH_DIR / "train_multinode.sbatch"), *TRAIN_ARGS,
                       env=worker_env(OUTPUT_DIR=str(out), NPROC_PER_NODE="1", RDZV_PORT=str(free_port())))
    nodes = slurm.cluster.nodes

    def state(done_ok: bool = False) -> tuple[str, int]:
        """(JobState, Restarts), read once; a job that failed (or completed too early) fails the test at once."""
        info = slurm.job(job)
        bad = ("FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY") + (() if done_ok else ("COMPLETED",))
        assert info["JobState"] not in bad, (info["JobState"], job_log.read_text()[-3000:])
        return info["JobState"], int(info["Restarts"])

    def running(restarts: int) -> bool:
        return state() == ("RUNNING", restarts)

    def signalled() -> bool:
        return job_log.exists() and "SIGTERM: stopping the training" in job_log.read_text()

    paused: list[psutil.Process] = []
    try:
        wait_until(lambda: running(0) and (len(logged_steps(out)) >= 40 or signalled()), "run 1 at step 40", 180)
        if not signalled():
            paused = [w for node in nodes for w in workers(node)]
            assert len(paused) == 2, paused
            for w in paused:
                w.suspend()
        wait_until(signalled, "the time-limit signal", 90)
        continued = datetime.now()
        for w in paused:
            w.resume()
        wait_until(lambda: state()[1] == 1, "run 1 to requeue itself", 120)
        wait_until(lambda: running(1) and latest_step(out) >= 60, "run 2's checkpoint of step 60", 180)
        slurm.scontrol("requeue", str(job))  # preemption
        wait_until(lambda: state()[1] == 2, "run 2 to be requeued", 120)
        slurm.scontrol("update", f"JobId={job}", "TimeLimit=10")
        wait_until(lambda: state(done_ok=True) == ("COMPLETED", 2), "run 3 to finish", 240)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{job_log.read_text()[-5000:] if job_log.exists() else ''}\n{slurm.logs()}") \
            from None
    finally:
        for w in paused:
            try:
                w.resume()
            except psutil.Error:
                pass
    text = job_log.read_text()
    assert len(re.findall(r"job \d+ run \d on ", text)) == 3, text[-5000:]
    assert text.count("not finished: requeueing job") >= 1  # run 1's time limit: the script requeued the job
    train_log = (out / "train.log").read_text()
    stops = sorted({(t, int(s)) for t, s in re.findall(r"^(.{19}) WARNING stopped by signal at step (\d+); saved "
                                                         r"'latest'", train_log, re.M)}, key=lambda x: x[1])
    assert len(stops) == 2, train_log[-3000:]
    # The time-limit stop was saved within the 5 s lead after the signal (after the workers ran again, if paused).
    signal_at = continued.replace(microsecond=0) if paused else next(
        log_time(line) for line in text.splitlines() if "SIGTERM: stopping the training" in line)
    assert (log_time(stops[0][0]) - signal_at).total_seconds() <= 5, (stops, signal_at)
    resumes = [int(r) for r in re.findall(r"resumed from \S+ \(step (\d+)", train_log)]
    assert resumes == [s for _, s in stops]  # each run resumed exactly where the previous one stopped
    assert_each_step_once_with_resume_markers(out, resumes=2)
    assert train_losses(out) == reference
    runs = out / "runs"  # one TensorBoard run (named after the output folder) across the three runs of the job
    assert sorted({p.parent.relative_to(runs).as_posix() for p in runs.rglob("events.out.tfevents.*")}) == ["run"]
    print(f"Slurm job {job}: stopped at steps {[s for _, s in stops]} (time limit, then preemption), 3 runs")


def test_a_node_cut_off_without_a_word_ends_the_run_within_the_hang_timeout(slurm: SlurmCluster,
                                                                            tmp_path: Path) -> None:
    """A partition: node2's link goes down at a random step. Unlike a kill, no connection closes: node1's worker
    just waits in its next collective, and would until the collective timeout (60 min by default, 1 here). The
    hang watchdog ends it first (--hang_timeout_minutes 0.25 here; by default the larger of 30 min and 20x the
    median step): the stacks of every thread in OUTPUT_DIR/hang/, one line naming the resume, exit 5, and
    node1's launcher ends with it. (node2's side is cut off the same way; its end is not what is measured.)"""
    n1, n2 = slurm.cluster.nodes
    out, port, hang_s = tmp_path / "run", free_port(), 15
    procs = [torchrun_on(node, n1, port, out, tmp_path / f"{node.hostname}.log", train_extra=(
        "--hang_timeout_minutes", str(hang_s / 60), "--collective_timeout_minutes", "1")) for node in (n1, n2)]
    try:
        cut_at = random.Random().randint(20, 60)
        print(f"node2's link goes down at step {cut_at}")
        wait_until(lambda: len(logged_steps(out)) >= cut_at, f"step {cut_at}", 240,
                   alive=lambda: procs[0].poll() is None)
        n2.set_link(False)
        t0 = time.monotonic()
        code = procs[0].wait(timeout=hang_s + 100)
        ended_s = time.monotonic() - t0
    finally:
        n2.set_link(True)
        for proc in procs:
            try:
                for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                    p.kill()
            except psutil.NoSuchProcess:
                pass
    log1 = (tmp_path / "node1.log").read_text()
    assert code != 0
    assert "hang watchdog: no training step completed" in log1 and "exiting with code 5" in log1, log1[-3000:]
    dumps = list((out / "hang").glob("rank0_pid*.txt"))
    assert len(dumps) == 1, dumps
    dump = dumps[0].read_text()
    assert "collective timeout in effect: 60.0 s" in dump and "trainer.py" in dump, dump[:3000]  # the loop's stack
    assert ended_s < hang_s + 45, ended_s  # the watchdog's timeout, its stack dump, the launcher's shutdown
    print(f"cut at step {cut_at}: node1 ended after {ended_s:.1f}s (hang timeout {hang_s}s, collective 60s)")
