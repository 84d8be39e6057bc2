"""predict on Ray (cluster/): local predict's rows, a killed model actor replaced, an interrupted run resumed.

One private local Ray serves the whole module (starting one costs seconds and ~1 GB).
"""
import csv
import os
import shutil
import signal

import pytest
from click.testing import CliRunner

from cnnbench import runtime
from cnnbench.cli import cli
from cnnbench.cluster import check_address, evaluate_on_ray, local_ray, predict_on_ray
from cnnbench.cluster.pipeline import ModelError, plan_actors
from cnnbench.common.device import user_threads
from cnnbench.common.errors import InputError
from runtime_testlib import run  # noqa: F401 (shared fixture)

ACTOR_TITLE = b"ray::MapWorker(MapBatches(ModelActor))"


@pytest.fixture(scope="module")
def ray_here(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    with local_ray(folder):
        yield folder


@pytest.fixture(scope="module")
def inputs(run, tmp_path_factory) -> list[str]:
    """The tiny run's 64 images with unusable files mixed into their folders, and one missing file."""
    root = tmp_path_factory.mktemp("cluster-images")
    images = os.path.join(root, "images")
    shutil.copytree(run["data"], images, ignore=shutil.ignore_patterns("*mask*"))
    folders = sorted(os.path.join(images, d) for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
    some_jpeg = next(os.path.join(folders[0], n) for n in sorted(os.listdir(folders[0])) if n.endswith(".jpg"))
    jpeg = open(some_jpeg, "rb").read()
    for name, content, folder in (("empty.jpg", b"", folders[0]), ("notes.jpg", b"not an image\n", folders[1]),
                                  ("cut.jpg", jpeg[: len(jpeg) // 2], folders[-1])):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return [images, os.path.join(root, "missing.jpg")]


@pytest.fixture(scope="module")
def local_csv(run, inputs, tmp_path_factory) -> str:
    """Local predict's CSV of the inputs: what every Ray run must reproduce."""
    path = os.path.join(tmp_path_factory.mktemp("local"), "local.csv")
    runtime.predict_files(run["checkpoint"], inputs, batch=16, csv=path, progress=False)
    return path


def rows(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def assert_same_rows(path: str, expected_path: str) -> None:
    """Same header, files in the same order, same statuses, classes and errors; probabilities to 1e-6
    (both are rounded to 6 decimals, so equal values may differ by one in the last place)."""
    got, expected = rows(path), rows(expected_path)
    assert got[0] == expected[0]
    assert [r[0] for r in got] == [r[0] for r in expected]
    probs = [i for i, name in enumerate(expected[0]) if name.startswith("prob_")]
    for g, e in zip(got[1:], expected[1:]):
        assert [c for i, c in enumerate(g) if i not in probs] == [c for i, c in enumerate(e) if i not in probs], g[0]
        for i in probs:
            if e[i]:
                assert float(g[i]) == pytest.approx(float(e[i]), abs=1.01e-6), g[0]


def test_same_results_as_local_predict(run, inputs, ray_here):
    local = runtime.predict_files(run["checkpoint"], inputs, batch=16, progress=False)
    on_ray = predict_on_ray(run["checkpoint"], inputs, batch=16, progress=False)

    assert [r["path"] for r in on_ray["results"]] == [r["path"] for r in local["results"]]
    for mine, theirs in zip(on_ray["results"], local["results"]):
        assert mine.get("error") == theirs.get("error"), mine["path"]
        if "top" in theirs:
            assert [t["class"] for t in mine["top"]] == [t["class"] for t in theirs["top"]], mine["path"]
            assert [t["prob"] for t in mine["top"]] == pytest.approx([t["prob"] for t in theirs["top"]], abs=1e-6)
    failed = {os.path.basename(r["path"]) for r in on_ray["results"] if "error" in r}
    assert failed == {"empty.jpg", "notes.jpg", "cut.jpg", "missing.jpg"}
    assert (on_ray["ok"], on_ray["failed"], on_ray["succeeded"]) == (False, 4, 64)
    assert on_ray["predictor"] == local["predictor"]
    assert sum(on_ray["ray"]["images_per_actor"].values()) == 68
    # The private Ray's token lives in its run folder, readable by this user only.
    assert os.stat(os.path.join(ray_here, "auth_token")).st_mode & 0o077 == 0


def test_cli_predict_on_ray_writes_local_predicts_csv(run, inputs, ray_here, local_csv, tmp_path):
    out = tmp_path / "ray.csv"
    done = CliRunner().invoke(cli, ["predict", *inputs, "--model", run["checkpoint"], "--batch", "16",
                                    "--csv", str(out), "--ray", "--json"])
    assert done.exit_code == 1, done.output  # as local predict: files failed
    assert_same_rows(str(out), local_csv)


def test_killed_model_actor_is_replaced_and_every_file_written_once(run, inputs, ray_here, local_csv, tmp_path):
    killed = []

    def kill_the_model_actor(result):
        if not killed:  # the first batch is back: the actor has more queued; SIGKILL it mid-run
            killed.extend(actor_pids())
            assert killed, "no model actor process found"
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    out = tmp_path / "killed.csv"
    summary = predict_on_ray(run["checkpoint"], inputs, batch=2, csv=out, progress=False,
                             on_result=kill_the_model_actor)

    assert killed
    assert len(summary["ray"]["images_per_actor"]) >= 2  # the killed actor's batches, then its replacement's
    assert_same_rows(str(out), local_csv)  # each file once, in input order


def test_interrupted_run_resumed_gives_the_same_file(run, inputs, ray_here, local_csv, tmp_path):
    out = tmp_path / "resumed.csv"
    seen = []

    def interrupt(result):
        seen.append(result)
        if len(seen) == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_on_ray(run["checkpoint"], inputs, batch=8, csv=out, progress=False, on_result=interrupt)
    written = len(rows(str(out))) - 1
    assert 20 <= written < 68

    resumed = predict_on_ray(run["checkpoint"], inputs, batch=8, csv=out, progress=False)
    assert resumed["resumed"] == written
    assert (resumed["succeeded"], resumed["failed"]) == (64, 4)
    assert_same_rows(str(out), local_csv)


def test_eval_on_ray_reports_local_evals_accuracy(run, ray_here):
    local = runtime.evaluate(run["checkpoint"], crops=1, batch=8, progress=False)
    on_ray = evaluate_on_ray(run["checkpoint"], crops=1, batch=8, progress=False)
    for key in ("test_images", "images", "top1", "top5", "mean_per_class", "failed", "split", "predictor"):
        assert on_ray[key] == local[key], key


def test_a_model_the_actors_cannot_run_is_one_clear_error(run, inputs, ray_here):
    with pytest.raises(ModelError, match="is a PyTorch checkpoint; the onnxruntime backend runs an export"):
        predict_on_ray(run["checkpoint"], inputs, backend="onnxruntime", progress=False)


def test_cpu_actors_share_the_cores_and_leave_one_to_decode(ray_here):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])  # the process's cores (at least two)
    plan = plan_actors("cpu", None, None)
    assert (plan.actors, plan.device, plan.resources) == (1, "cpu", {"num_cpus": 1})
    assert plan.threads == (user_threads() or cpus)
    with pytest.raises(InputError, match="leave none to decode"):
        plan_actors("cpu", cpus, None)


def test_ray_option_refuses_a_path_taken_for_an_address():
    assert check_address("10.0.0.5:6379") == "10.0.0.5:6379"
    assert check_address("ray://head:10001") == "ray://head:10001"
    with pytest.raises(InputError, match="--ray=auto"):
        check_address("photos/")


def actor_pids() -> list[int]:
    """Processes whose title Ray set to the model actor's (Ray sets it on its worker processes)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read()
            except OSError:
                continue
            if title.startswith(ACTOR_TITLE):
                pids.append(int(entry))
    return pids
