"""`fedge-hub`: the hub side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    """One round from contribution files: synthesize, train, export ONNX, publish a version."""
    from pydantic import ValidationError

    import bundled
    from contract.payloads import Contribution
    from hub.foundation.bundle import load
    from hub.registry import ModelRegistry
    from hub.rounds import TrainConfig, publish, run_round
    from hub.synthesis import SynthesisConfig, Synthesizer

    contributions = []
    for f in args.contributions:
        try:
            contributions.append(Contribution.model_validate_json(Path(f).read_bytes()))
        except ValidationError as err:
            print(f"error: {f} is not a valid contribution:\n{err}", file=sys.stderr)
            return 2
    fm = load(bundled.resolve(args.bundle))
    synth = Synthesizer(
        fm, SynthesisConfig(samples_per_count=args.samples_per_count, seed=args.seed), cache_dir=args.cache
    )
    result = run_round(contributions, synth, TrainConfig(epochs=args.epochs, seed=args.seed))
    version = publish(result, ModelRegistry(args.models), contributions, {"foundation": fm.encoder_id})
    print(
        json.dumps(
            {
                k: version.manifest[k]
                for k in ("version", "sha256", "size_bytes", "synthetic_samples", "synthesis_s", "training_s")
            },
            indent=1,
        )
    )
    print(f"model: {version.path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a hub worker until SIGTERM or Ctrl-C."""
    import logging

    from hub.config import HubSettings
    from hub.service import HubService
    from runtime.httpd import run_service
    from runtime.settings import validate_or_exit

    settings = validate_or_exit(HubSettings, args.config, args.validate_config)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_service(HubService(settings), settings, logging.getLogger("fedge.hub"))


def cmd_round(args: argparse.Namespace) -> int:
    """Ask the running hub for a round now (recorded in its ledger; the hub picks it up within a poll)."""
    from hub.config import HubSettings
    from hub.ledger import Ledger
    from runtime.settings import validate_or_exit

    settings = validate_or_exit(HubSettings, args.config, False)
    ledger = Ledger(settings.state_dir / "ledger.sqlite")
    try:
        round_id = ledger.request_round("manual")
    finally:
        ledger.close()
    print(f"round {round_id} requested; the hub starts it within {settings.rounds.poll_s:g} s")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the ledger's view: contributions by state, rounds, rejections, evaluations."""
    from hub.config import HubSettings
    from hub.ledger import Ledger
    from runtime.settings import validate_or_exit

    settings = validate_or_exit(HubSettings, args.config, False)
    ledger = Ledger(settings.state_dir / "ledger.sqlite")
    try:
        out = {
            "contributions": ledger.counts_by_state(),
            "rounds": [r.__dict__ for r in ledger.rounds()[-10:]],
            "rejections": ledger.rejections()[-10:],
            "evaluations": ledger.evaluations()[-20:],
        }
    finally:
        ledger.close()
    print(json.dumps(out, indent=1, default=str))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Export the audit trail (JSONL + CSV) or verify an exported one."""
    from hub.unlearning import audit

    if args.action == "verify":
        if args.folder is None:
            print("error: give the exported folder: fedge-hub audit verify DIR", file=sys.stderr)
            return 2
        pem = args.hub_key.read_text() if args.hub_key else None
        report = audit.verify(args.folder, pem)
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    from hub.config import HubSettings
    from hub.ledger import Ledger
    from runtime.settings import validate_or_exit

    settings = validate_or_exit(HubSettings, args.config, False)
    path = settings.state_dir / "ledger.sqlite"
    if not path.is_file():
        print(f"error: no ledger at {path}: is state_dir right, and has this hub ever run?", file=sys.stderr)
        return 2
    pub = settings.signing_key_path().with_suffix(".pub.pem")
    if not pub.is_file():
        print(f"error: the hub's public key {pub} is missing", file=sys.stderr)
        return 2
    ledger = Ledger(path)
    try:
        counts = audit.export(ledger, pub.read_text(), args.out)
    finally:
        ledger.close()
    print(json.dumps({"out": str(args.out), "rows": counts}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedge-hub`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export-encoders"]:
        from hub.foundation.export_encoders import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["demo-data"]:
        from hub.demo import data_main

        return data_main(argv[1:])
    if argv[:1] == ["demo"]:
        from hub.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:2] == ["foundation", "train"]:
        from hub.foundation.train import main as train_main

        return train_main(argv[2:])
    if argv[:2] == ["foundation", "evaluate"]:
        from hub.foundation.train import evaluate_main

        return evaluate_main(argv[2:])
    ap = argparse.ArgumentParser(prog="fedge-hub", description="fedge hub: synthesize from prototypes, train, unlearn")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fnd = sub.add_parser("foundation", help="foundation model commands: `fedge-hub foundation train --help`")
    fnd.add_argument("action", choices=["train", "evaluate"])
    sub.add_parser("demo", help="broker, hub and three sites, one round, offline: `fedge-hub demo --help`")
    sub.add_parser(
        "export-encoders",
        help="Stable Diffusion's CLIP encoders to ONNX for the edges: `fedge-hub export-encoders --help`",
    )
    sub.add_parser("demo-data", help="write the demo sites' data folders: `fedge-hub demo-data --help`")
    tr = sub.add_parser("train", help="run one round from contribution JSON files")
    tr.add_argument("contributions", nargs="+", type=Path)
    tr.add_argument("--bundle", default="digits")
    tr.add_argument("--models", type=Path, default=Path("var/hub/models"))
    tr.add_argument("--cache", type=Path, default=Path("var/hub/synthesis-cache"))
    tr.add_argument("--samples-per-count", type=float, default=2.0)
    tr.add_argument("--epochs", type=int, default=30)
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(fn=cmd_train)
    run = sub.add_parser("run", help="run a hub worker (config: --config YAML and FEDGE_HUB_* variables)")
    run.add_argument("--config", type=Path, help="YAML file; environment variables FEDGE_HUB_* override it")
    run.add_argument("--validate-config", action="store_true", help="check the configuration, print it and exit")
    run.add_argument("--log-level", default="INFO")
    run.set_defaults(fn=cmd_run)
    rnd = sub.add_parser("round", help="`fedge-hub round start`: ask the running hub for a round now")
    rnd.add_argument("action", choices=["start"])
    rnd.add_argument("--config", type=Path)
    rnd.set_defaults(fn=cmd_round)
    st = sub.add_parser("status", help="contributions, rounds, rejections and evaluations from the ledger")
    st.add_argument("--config", type=Path)
    st.set_defaults(fn=cmd_status)
    au = sub.add_parser("audit", help="`audit export --out DIR`: the trail as JSONL + CSV; `audit verify DIR`")
    au.add_argument("action", choices=["export", "verify"])
    au.add_argument("folder", nargs="?", type=Path, help="verify: the exported folder")
    au.add_argument("--config", type=Path, help="export: the hub's YAML (for state_dir and its key)")
    au.add_argument("--out", type=Path, default=Path("audit"), help="export: output folder")
    au.add_argument("--hub-key", type=Path, help="verify: the hub's public key, as its operator gave it to you")
    au.set_defaults(fn=cmd_audit)
    args = ap.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
