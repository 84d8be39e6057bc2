"""The demo's training runs: a folder is reused only by the settings that made it, cores come from the
process's affinity, and side-by-side trainers report failures at once and never outlive the demo."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cnnbench.common import device as device_module
from cnnbench.common.device import cores_per_job, side_by_side_threads
from cnnbench.demo import pipeline
from cnnbench.demo.pipeline import DemoSettings, TrainerFailed, default_out
from cnnbench.train.loop import RunMismatchError

REPO = Path(__file__).resolve().parents[1]
# Two tiny runs; LONG ones train far longer than any test waits (they are stopped or killed mid-run).
TINY = DemoSettings(archs=("resnet18", "xception_small"), epochs=(("resnet18", 1), ("xception_small", 1)),
                    width_mult=0.125, batch_size=16)
LONG = DemoSettings(archs=("resnet18", "xception_small"), epochs=(("resnet18", 200), ("xception_small", 200)),
                    width_mult=0.125, batch_size=16)


def test_quick_and_full_demo_never_share_a_folder():
    assert default_out(quick=True) != default_out(quick=False) == "runs/demo"


def test_a_run_folder_is_reused_only_by_the_settings_that_made_it(tmp_path, monkeypatch):
    """`demo --quick` then `demo` in one folder, on tiny sizes: the second stops in one line naming what
    differs; the same settings again reuse the finished runs. Pinned to one core, the runs train one
    after the other (what `taskset -c 0 python cli.py demo --quick` does)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    steps = []
    first = pipeline._train_all(steps, TINY, quick=True, out=tmp_path, progress=False)
    assert [s["step"] for s in steps] == ["train resnet18", "train xception_small"]
    wider = DemoSettings(archs=TINY.archs, epochs=TINY.epochs, width_mult=0.25, batch_size=16)
    with pytest.raises(RunMismatchError) as caught:
        pipeline._train_all([], wider, quick=True, out=tmp_path, progress=False)
    message = str(caught.value)
    assert "width_mult 0.125 → 0.25" in message and f"delete {tmp_path}" in message and "\n" not in message
    again = pipeline._train_all([], TINY, quick=True, out=tmp_path, progress=False)
    for arch, summary in again.items():  # reused: nothing trained again
        assert summary["parts"] == first[arch]["parts"] and summary["final"] == first[arch]["final"]


def test_cores_come_from_the_affinity_and_a_users_omp_num_threads_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert cores_per_job(2) == 8 and side_by_side_threads(2, device="cpu") == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert side_by_side_threads(2, device="cpu") == 0 and cores_per_job(2) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cores_per_job(2) == 3 and device_module.default_workers() == 2


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"),
                    reason="needs taskset and sched_getaffinity (Linux)")
def test_under_taskset_one_core_the_demo_trains_one_run_after_the_other():
    done = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                           "from cnnbench.common.device import available_cores, side_by_side_threads; "
                           "print(available_cores(), side_by_side_threads(2, device='cpu'))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"]


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, running a multiprocessing spawn child."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z" and b"spawn_main" in cmdline:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_trainers_die_with_the_demo_killed_by_sigkill(tmp_path):
    script = textwrap.dedent(f"""
        from pathlib import Path
        from cnnbench.demo.pipeline import DemoSettings, _train_side_by_side
        _train_side_by_side(DemoSettings(archs=("resnet18", "xception_small"), epochs=(("resnet18", 200),
                            ("xception_small", 200)), width_mult=0.125, batch_size=16), True, Path({str(tmp_path)!r}),
                            False)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    trainers = []
    try:
        runs = [tmp_path / "train" / arch / "split.json" for arch in LONG.archs]
        _wait_for(lambda: all(p.exists() for p in runs), 240, "both trainers to start training")
        trainers = _wait_for(lambda: len(_children(parent.pid)) == 2 and _children(parent.pid), 30, "two trainers")
        parent.kill()  # SIGKILL: no handler, no cleanup in the parent
        parent.wait()
        killed_at = time.monotonic()
        _wait_for(lambda: not any(_alive(pid) for pid in trainers), 10, "the trainers to exit")
        assert time.monotonic() - killed_at < 5
    finally:  # never leave a trainer behind, whatever failed above
        parent.kill()
        for pid in trainers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_trainer_that_raises_is_reported_at_once_by_its_architecture(tmp_path):
    broken = DemoSettings(archs=("resnet18", "no_such_net"), epochs=LONG.epochs, width_mult=0.125, batch_size=16)
    started = time.monotonic()
    with pytest.raises(TrainerFailed, match="training no_such_net failed: unknown architecture 'no_such_net'"):
        pipeline._train_side_by_side(broken, True, tmp_path, False)
    assert time.monotonic() - started < 90  # the child's start (torch's import) and no more; resnet18 alone: minutes
    import multiprocessing
    assert not multiprocessing.active_children()  # the sibling was stopped, not left training


def test_a_killed_trainer_is_named(tmp_path):
    import multiprocessing

    def kill_resnet18():
        split = tmp_path / "train" / "resnet18" / "split.json"
        child = _wait_for(lambda: split.exists() and [c for c in multiprocessing.active_children()
                                                      if c.name == "train resnet18"], 240, "the resnet18 trainer")
        os.kill(child[0].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_resnet18, daemon=True)
    killer.start()
    with pytest.raises(TrainerFailed, match=r"the resnet18 trainer died \(killed by signal SIGKILL\)"):
        pipeline._train_side_by_side(LONG, True, tmp_path, False)
    killer.join()
    assert not multiprocessing.active_children()
