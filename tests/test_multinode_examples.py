"""The multi-node launchers in examples/ (docs/multinode.md): valid shell, launcher flags their launcher accepts, and a
``lit-accel fit`` command line that the CLI parses (``--print_config``, on the CPU) into the node and device counts
the launcher starts, with a config that exists."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lit_accel.cli import LitAccelCLI

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ROOT / "examples" / "torchrun_multinode.sh"
SBATCH = ROOT / "examples" / "slurm_multinode.sbatch"


def _command(path: Path, starts: str) -> str:
    """The first command of ``path`` that begins with ``starts`` (after ``exec``), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip().removeprefix("exec ")
        if line.startswith(starts):
            return line
    raise AssertionError(f"{path.name} has no command starting with {starts!r}")


def _defaults(path: Path) -> dict[str, str]:
    """``NAME="${NAME:-default}"`` assignments of a script: the values it runs with unless the caller sets them."""
    return dict(re.findall(r'^(\w+)="\$\{\1:-([^}]*)\}"$', path.read_text(), flags=re.MULTILINE))


def _expand(command: str, values: dict[str, str]) -> list[str]:
    """``command`` split as the shell would, with ``"$@"`` (the caller's extra flags) empty and ``$NAME`` replaced."""
    tokens = shlex.split(command.replace('"$@"', ""))
    out = []
    for token in tokens:
        for name in re.findall(r"\$\{?(\w+)\}?", token):
            assert name in values, f"{name} is neither set by the script nor given by the test"
            token = re.sub(rf"\$\{{?{name}\}}?", values[name], token)
        out.append(token)
    return out


def _print_config(fit_args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """What ``lit-accel fit ARGS --print_config`` prints (parsing only: no GPU, no process group)."""
    assert fit_args[0] == "fit", fit_args
    with pytest.raises(SystemExit) as done:
        LitAccelCLI(args=[*fit_args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", [TORCHRUN, SBATCH], ids=lambda p: p.name)
def test_script_is_valid_shell(path: Path) -> None:
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(path)], check=True)


def test_torchrun_example_starts_a_fit_that_the_cli_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.distributed.run import get_args_parser

    monkeypatch.chdir(ROOT)
    values = {**_defaults(TORCHRUN), "NNODES": "2", "HEAD": "node001"}
    args = get_args_parser().parse_args(_expand(_command(TORCHRUN, "torchrun "), values)[1:])
    assert (args.nnodes, args.nproc_per_node) == ("2", values["GPUS_PER_NODE"])
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("c10d", f"node001:{values['PORT']}")
    assert args.no_python and args.training_script == "lit-accel"
    assert (ROOT / values["CONFIG"]).is_file()
    config = _print_config(args.training_script_args, capsys)
    # `--trainer.devices 8` stays the string "8" (Trainer's devices is list | str | int), which Lightning reads as 8.
    assert config["trainer"]["num_nodes"] == 2 and str(config["trainer"]["devices"]) == values["GPUS_PER_NODE"]


def test_slurm_example_starts_a_fit_that_the_cli_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", SBATCH.read_text(), flags=re.MULTILINE))
    assert {"nodes", "ntasks-per-node", "gpus-per-node"} <= set(sbatch)
    assert sbatch["ntasks-per-node"] == sbatch["gpus-per-node"]  # one process per GPU
    # What SLURM sets in the job's environment from those lines.
    values = {**_defaults(SBATCH), "SLURM_NNODES": sbatch["nodes"], "SLURM_NTASKS_PER_NODE": sbatch["ntasks-per-node"]}
    command = _expand(_command(SBATCH, "srun "), values)
    launcher = command.index("lit-accel")
    assert all(flag.startswith("--") for flag in command[1:launcher]), command  # srun's own options, then the program
    assert (ROOT / values["CONFIG"]).is_file()
    config = _print_config(command[launcher + 1 :], capsys)
    assert config["trainer"]["num_nodes"] == int(sbatch["nodes"])
    assert str(config["trainer"]["devices"]) == sbatch["ntasks-per-node"]
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lit_accel.strategies.LitDeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == 3 and strategy["init_args"]["zero_hpz_partition_size"] == "node"
