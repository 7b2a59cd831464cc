"""`fedge-hub` commands that must answer honestly and at once: no ledger, no hub, `--help` without torch, threads."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub.cli import main as hub_main
from hub.ledger import Ledger
from runtime.threads import DEFAULT_THREADS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_yaml(tmp_path: Path, **extra: object) -> Path:
    conf = tmp_path / "hub.yaml"
    conf.write_text(json.dumps({"state_dir": str(tmp_path / "state"), **extra}))  # JSON is YAML
    return conf


@pytest.mark.parametrize("command", [["status"], ["round", "start"]])
def test_a_state_dir_without_a_ledger_is_refused_and_left_alone(tmp_path: Path, capsys, command) -> None:
    conf = hub_yaml(tmp_path)

    code = hub_main([*command, "--config", str(conf)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and str(tmp_path / "state" / "ledger.sqlite") in err[0]
    assert not (tmp_path / "state").exists()  # no empty ledger made up on the way


def test_round_start_says_when_no_hub_answers(tmp_path: Path, capsys) -> None:
    conf = hub_yaml(tmp_path, metrics_host="127.0.0.1", metrics_port=free_port())
    Ledger(tmp_path / "state" / "ledger.sqlite").close()  # a hub ran here once

    assert hub_main(["round", "start", "--config", str(conf)]) == 0

    out = capsys.readouterr().out
    assert "round 1 requested, but no hub answers at http://127.0.0.1:" in out
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    try:
        assert [r.trigger for r in ledger.rounds()] == ["manual"]  # recorded: a hub started later runs it
    finally:
        ledger.close()


def test_round_start_says_it_cannot_tell_without_a_metrics_port(tmp_path: Path, capsys) -> None:
    conf = hub_yaml(tmp_path, metrics_port=None)
    Ledger(tmp_path / "state" / "ledger.sqlite").close()

    assert hub_main(["round", "start", "--config", str(conf)]) == 0

    assert "whether a hub runs is unknown" in capsys.readouterr().out


def test_status_reads_an_existing_ledger(tmp_path: Path, capsys) -> None:
    conf = hub_yaml(tmp_path, broker={"username": "hub", "password_file": str(tmp_path / "absent")})
    Ledger(tmp_path / "state" / "ledger.sqlite").close()

    assert hub_main(["status", "--config", str(conf)]) == 0  # reading state does not need the broker's files

    assert json.loads(capsys.readouterr().out)["rounds"] == []


HELP_PROBE = """
import sys
from hub.cli import main
try:
    main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
assert "torch" not in sys.modules, "torch was imported"
assert "diffusers" not in sys.modules, "diffusers was imported"
"""


@pytest.mark.parametrize(
    "argv", [["foundation", "train", "--help"], ["export-encoders", "--help"], ["foundation", "evaluate", "--help"]]
)
def test_help_of_heavy_commands_does_not_import_torch(argv: list[str]) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", HELP_PROBE.format(argv=argv)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    assert out.returncode == 0, out.stderr
    assert "usage: fedge-hub" in out.stdout
    # CPU time, not wall time: on an idle machine they agree (about 0.2 s); on a busy one only the
    # CPU time still measures this command rather than the machine's load.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 2.0, f"{argv}: {cpu:.2f} s of CPU ({wall:.2f} s wall)"


def test_threads_option_defaults_to_the_shared_machine_setting(capsys) -> None:
    for argv in (["run", "--help"], ["train", "--help"], ["foundation", "train", "--help"]):
        with pytest.raises(SystemExit):
            hub_main(argv)
        assert "--threads N" in capsys.readouterr().out, argv


THREADS_PROBE = """
import sys
from runtime.threads import size_pools
assert size_pools(2) == 2
assert "torch" not in sys.modules  # the edge's call: torch stays out
assert size_pools(3, import_torch=True) == 3
import torch
assert (torch.get_num_threads(), torch.get_num_interop_threads()) == (3, 3)
"""


def test_size_pools_sizes_torch_only_where_it_is_wanted() -> None:
    out = subprocess.run([sys.executable, "-c", THREADS_PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert DEFAULT_THREADS >= 1


def test_run_refuses_the_cnn_on_a_bundle_without_an_image_generator(tmp_path: Path, capsys) -> None:
    # An encoder-only bundle (as the general one is): the digits bundle's encoder and manifest, no generator.
    import shutil

    import bundled

    bundle = tmp_path / "encoder-only"
    bundle.mkdir()
    for name in ("encoder.onnx", "manifest.json"):
        shutil.copy(bundled.path("digits") / name, bundle / name)
    conf = hub_yaml(tmp_path, foundation=str(bundle), model="cnn", metrics_port=None)

    code = hub_main(["run", "--config", str(conf)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "no image generator" in err[0] and "closed_form" in err[0]
