"""Every command line in README.md's fenced bash/console blocks runs, in README order, on tiny data.

A documented command can never break unnoticed. The commands are taken from the README itself and
changed in two documented ways only:
- paths to the user's own files (Caltech-256, ImageNet weights, images) become tiny stand-ins (PATHS);
- flags appended to commands that would take minutes (TINY_FLAGS); click takes the last value of a
  repeated option, so an appended ``--epochs 1`` overrides the README's ``--epochs 40``. A `bench
  --compile` also gets ``--backend onnxruntime``: torch.compile's max-autotune alone takes minutes
  per row on two cores.
Lines that cannot run here are listed in NOT_RUN with the reason; every other line must run and exit
0, with one allowance: a tiny one-epoch stand-in model is not robust to 8-bit activations, so an
`export --int8` may exit 1 when the int8 graph's own parity gate (unchanged) is its only failure
(tests/test_export_int8.py explains; the gate itself is tested there).
They run in one working folder, in order, after `python cli.py demo` (the shared quick demo), as a
user following the README top to bottom would.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Appended to `python cli.py <command>`; the subcommand's first word picks the list.
TINY_FLAGS = {
    "train": ["--epochs", "1", "--workers", "0", "--image-size", "64", "--width-mult", "0.125", "--batch-size", "16"],
    # `bench --batch 64` runs 640 crops per timed call through every row (emulated bf16 included): minutes.
    "bench": ["--seconds", "0.1", "--warmup", "1", "--eval-images", "8", "--batch", "2"],
    # bench --scenario: LoadGen's runs take bench's own options only (the closed loop's --warmup, --eval-images
    # are refused with it); one thread, short runs, fp32 only: on a CPU without bf16 units the emulated bf16
    # row's Server search alone took 45 of the command's 77 s.
    "bench --scenario": ["--seconds", "0.2", "--batch", "2", "--threads", "1", "--precision", "fp32"],
    # MultiStream's 662 queries and Server's search take minutes with ten crops: tests/test_bench_mlperf.py runs them.
    "mlperf": ["--crops", "1", "--scenario", "offline", "--scenario", "singlestream", "--seconds", "0.2",
               "--images", "16", "--threads", "1"],
}
TINY_FLAGS_FINETUNE = ["--epochs", "1", "--workers", "0", "--image-size", "71"]  # one size: no --width-mult
# Commands given no paths after the demo say which runs they picked (common.runs.newest_runs).
PICKED = {
    "python cli.py gradcam img.jpg": "using the newest trained runs in runs/demo/train",
    "python cli.py export --fp16": "using the newest trained runs in runs/demo/train",
    "python cli.py bench --batch 64": "using the newest exports in runs/export",
}
NOT_RUN = {
    "pip install": "installs the package (the tests run from the checkout)",
    "python -m pytest": "the test suite itself",
    "torchrun --nnodes 2": "needs a second machine and CUDA GPUs",
}


def readme_commands(text: str) -> list[str]:
    """Command lines of the ```bash and ```console blocks: continuations joined, `$ ` prompts and
    console output dropped, `a && b` split into its commands."""
    commands = []
    for lang, body in re.findall(r"^```(bash|console)\n(.*?)^```", text, flags=re.M | re.S):
        lines = body.replace("\\\n", " ").splitlines()
        if lang == "console":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        for line in lines:
            words = shlex.split(line, comments=True)
            if words:
                commands += [part.strip() for part in shlex.join(words).split(" '&&' ")]
    return commands


def test_readme_parser_sees_every_block():
    text = "```bash\npython cli.py a --x 1 \\\n    --y 2   # note\npip install . && python cli.py b\n```\n" \
           "```console\n$ python cli.py c /tmp/x\noutput line\n```\n```\nnot a command\n```\n"
    assert readme_commands(text) == ["python cli.py a --x 1 --y 2", "pip install .", "python cli.py b",
                                     "python cli.py c /tmp/x"]


@pytest.fixture(scope="module")
def stand_ins(quick_demo, tmp_path_factory):
    """Tiny versions of the user's files the README names, and the substitutions that point at them."""
    from cnnbench.data import synth

    folder = tmp_path_factory.mktemp("readme-files")
    caltech = synth.default_data_root(quick=True, progress=False)  # Caltech-256 layout, 8 classes
    timm = pytest.importorskip("timm")
    weights = folder / "legacy_xception.pth"
    torch.save(timm.create_model("legacy_xception", pretrained=False).state_dict(), weights)
    images = folder / "ex"
    images.mkdir()
    first = sorted(Path(caltech).glob("*/*.jpg"))[:3]
    for path in first:
        Image.open(path).save(images / path.name)
    return {
        "~/data/256_ObjectCategories": caltech,
        "~/weights/legacy_xception.pth": str(weights),
        "/tmp/ex": str(images),
        "img.jpg": str(images / first[0].name),
    }


def tiny(words: list[str], paths: dict) -> list[str]:
    words = [paths.get(w, w) for w in words]
    program, rest = (words[:2], words[2:]) if words[0] == "python" else (words[:1], words[1:])
    cli_args = rest[rest.index("cli.py") + 1:] if "cli.py" in rest else rest
    if cli_args and cli_args[0] == "train":
        extra = TINY_FLAGS_FINETUNE if cli_args[1] == "xception_pretrained" else TINY_FLAGS["train"]
        if "--data" not in cli_args:
            extra = extra + ["--quick-data"]
        return words + extra
    kind = cli_args[0] if cli_args else ""
    extra = TINY_FLAGS.get(f"{kind} --scenario" if "--scenario" in cli_args else kind, [])
    if cli_args and cli_args[0] == "bench" and "--compile" in cli_args:
        extra = extra + ["--backend", "onnxruntime"]
    return words + extra


def only_int8_gate_failed(args: list[str], output: str) -> bool:
    failures = [line for line in output.splitlines() if line.startswith("FAILED: ")]
    return (args[2] == "export" and "--int8" in args and bool(failures)
            and all("int8 parity failed" in line for line in failures))


def test_every_readme_command_runs(quick_demo, stand_ins, monkeypatch):
    from cnnbench import cli
    workdir, _ = quick_demo
    monkeypatch.chdir(workdir)
    if not (workdir / "cli.py").exists():  # `torchrun ... cli.py` names the script relative to the folder
        (workdir / "cli.py").symlink_to(REPO / "cli.py")
    commands = readme_commands(README.read_text())
    ran, skipped = [], []
    for command in commands:
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            skipped.append(command)
            continue
        words = shlex.split(command)
        if words[:2] == ["python", "cli.py"] and words[2] == "demo":
            ran.append(command)  # the shared quick demo ran it in this folder (flag: --quick)
            continue
        args = tiny(words, stand_ins)
        if args[0] == "torchrun":
            env = dict(os.environ, OMP_NUM_THREADS="1")
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args[1:]],
                                  cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        else:
            assert args[:2] == ["python", "cli.py"], f"README command not understood: {command}"
            result = CliRunner().invoke(cli.cli, args[2:], catch_exceptions=True)
            assert result.exit_code == 0 or only_int8_gate_failed(args, result.output), \
                f"{command}\n-> {shlex.join(args)}\n{result.output[-3000:]}\n{result.exception!r}"
            assert PICKED.get(command, "") in result.output, command
        ran.append(command)
    assert set(PICKED) <= set(ran)
    assert len(ran) >= 12 and all(any(c.startswith(p) for p in NOT_RUN) for c in skipped)
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for c in skipped), f"NOT_RUN entry {prefix!r} no longer matches a README line"
