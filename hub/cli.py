"""`fedge-hub`: the hub side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.threads import DEFAULT_THREADS, size_pools

# Heavy modules (torch, diffusers) are imported inside the commands, after their arguments are parsed,
# so that `--help` and argument errors answer at once.


def cmd_train(args: argparse.Namespace) -> int:
    """One round from contribution files: synthesize, train, export ONNX, publish a version."""
    from pydantic import ValidationError

    import bundled
    from contract.payloads import Contribution
    from hub.foundation.bundle import load
    from hub.registry import ModelRegistry
    from hub.rounds import TrainConfig, publish, run_round
    from hub.synthesis import SynthesisConfig, Synthesizer

    size_pools(args.threads or DEFAULT_THREADS, import_torch=True)
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
    size_pools(args.threads or settings.threads, import_torch=True)  # before any model or onnxruntime session
    try:
        service = HubService(settings)
    except ValueError as err:  # a configuration the bundle cannot serve: one line, no traceback
        print(f"fedge-hub run: {err}", file=sys.stderr)
        return 2
    return run_service(service, settings, logging.getLogger("fedge.hub"))


def _existing_ledger(args: argparse.Namespace):
    """(settings, ledger) of the configured state_dir; prints one line and returns None when it has no ledger."""
    from hub.config import HubSettings
    from hub.ledger import Ledger
    from runtime.settings import validate_or_exit

    settings = validate_or_exit(HubSettings, args.config, False, check_paths=False)
    path = settings.state_dir / "ledger.sqlite"
    if not path.is_file():  # opening it would create an empty one, and report an empty hub as if it were real
        print(f"error: no ledger at {path}: is state_dir right (--config), and has a hub run there?", file=sys.stderr)
        return None
    return settings, Ledger(path)


def health_url(settings) -> str | None:
    """The hub's /healthz on this machine, from its settings; None when it has no fixed metrics port."""
    if not settings.metrics_port:  # null: no endpoint; 0: a port the hub picked, which we cannot know
        return None
    host = "127.0.0.1" if settings.metrics_host in ("0.0.0.0", "") else settings.metrics_host
    return f"http://{host}:{settings.metrics_port}/healthz"


def hub_answers(url: str) -> bool:
    """Whether anything answers HTTP at `url` within a second (a 503 is a hub that is up but unhealthy)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def cmd_round(args: argparse.Namespace) -> int:
    """Ask the running hub for a round now (recorded in its ledger; the hub picks it up within a poll)."""
    found = _existing_ledger(args)
    if found is None:
        return 2
    settings, ledger = found
    try:
        round_id = ledger.request_round("manual")
    finally:
        ledger.close()
    url = health_url(settings)
    if url is not None and not hub_answers(url):
        print(f"round {round_id} requested, but no hub answers at {url}; a hub started on {settings.state_dir} "
              "will run it")  # fmt: skip
        return 0
    unknown = " (metrics_port is off, so whether a hub runs is unknown)" if url is None else ""
    print(f"round {round_id} requested; the hub starts it within {settings.rounds.poll_s:g} s{unknown}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the ledger's view: contributions by state, rounds, rejections, evaluations (each head's confusion
    matrix) and the delivery gate's decisions on the newest versions."""
    found = _existing_ledger(args)
    if found is None:
        return 2
    _, ledger = found
    try:
        gates = []
        for d in ledger.decisions("delivery_gate", 5):
            detail = json.loads(d["detail"])
            detail.pop("signed_manifest", None)  # in the audit export; here, what was decided and why
            gates.append({"model": d["subject"], **detail})
        out = {
            "contributions": ledger.counts_by_state(),
            "rounds": [r.__dict__ for r in ledger.rounds()[-10:]],
            "rejections": ledger.rejections()[-10:],
            "evaluations": ledger.evaluations()[-20:],
            "delivery_gate": gates,
        }
    finally:
        ledger.close()
    print(json.dumps(out, indent=1, default=str))
    return 0


def cmd_framu(args: argparse.Namespace) -> int:
    """FRAMU: its attention per model version, its decisions, and the operator's pins."""
    found = _existing_ledger(args)
    if found is None:
        return 2
    settings, ledger = found
    try:
        if args.action in ("pin", "unpin"):
            if not args.subject:
                print(f"error: framu {args.action} needs a contribution id or a site id", file=sys.stderr)
                return 2
            if args.action == "pin":
                done = ledger.pin(args.subject, args.note or "")
                print(
                    f"{args.subject} {'pinned' if done else 'was already pinned'}: FRAMU never unlearns it on its own"
                )
            else:
                done = ledger.unpin(args.subject)
                print(f"{args.subject} {'unpinned' if done else 'was not pinned'}")
            return 0
        out = {
            "mode": settings.framu.mode,
            "pins": sorted(ledger.pins()),
            "rounds": ledger.framu_rounds()[-5:],
            "unlearned": ledger.uncertified_unlearning(),
            "decisions": ledger.decisions("framu", 20),
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

    settings = validate_or_exit(HubSettings, args.config, False, check_paths=False)
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


def add_threads_argument(ap: argparse.ArgumentParser) -> None:
    """`--threads N`: torch's and onnxruntime's pool sizes (runtime/threads.py)."""
    ap.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help=f"threads per torch and onnxruntime pool (default {DEFAULT_THREADS}, for a machine shared with other "
        "work; raise it to the cores this command may use)",
    )  # fmt: skip


def foundation_train_parser() -> argparse.ArgumentParser:
    """Arguments of `fedge-hub foundation train` (here, so that --help does not load torch)."""
    ap = argparse.ArgumentParser(
        prog="fedge-hub foundation train",
        description="Train a foundation model (SimCLR encoder and embedding-conditioned generator; neither sees a "
        "label). digits and mnist train on their protocol's public split; a folder is public as a whole, labelled "
        "(<label>/<sample>) or flat (images directly in it). Of a folder with two or more labels, --quality-holdout "
        "(10 %, at least 5 images per label) is held back for the quality estimate; everything else trains. "
        "Image sides: 8, 10, 12, 14, 16, 20, 24, 28, 32 (others: --image-size). See docs/foundation.md.",
    )
    ap.add_argument("--dataset", default="digits", help="digits, mnist (14x14), or a folder <label>/<sample> or flat")
    ap.add_argument(
        "--out", type=Path,
        help="bundle directory (default: ~/.cache/fedge/bundles/<name>, outside the repository)",
    )  # fmt: skip
    ap.add_argument("--name", help="bundle name used in the encoder id (default: the dataset or folder name)")
    ap.add_argument(
        "--image-size", type=int, metavar="S",
        help="resize every image to S x S first, the whole image as edges do (contract.layout.fit_image)",
    )  # fmt: skip
    ap.add_argument(
        "--time-budget", type=float, metavar="SECONDS",
        help="stop training (encoder at most 20 %%, then the generator) at this many seconds and save; the "
        "schedules are planned over the steps it affords. Export and the quality estimate come after it",
    )  # fmt: skip
    ap.add_argument(
        "--quality-holdout", type=float, default=0.1, metavar="FRAC",
        help="share of each label held back from training for the quality estimate (default 0.1, at least 5 "
        "images per label, at most half; 0: none, no score). Nothing is held back without two labels",
    )  # fmt: skip
    ap.add_argument("--diffusion-steps", type=int, help="override the recipe's generator steps")
    ap.add_argument("--simclr-steps", type=int, help="override the recipe's encoder steps")
    ap.add_argument("--seed", type=int, default=0)
    add_threads_argument(ap)
    return ap


def foundation_evaluate_parser() -> argparse.ArgumentParser:
    """Arguments of `fedge-hub foundation evaluate`."""
    ap = argparse.ArgumentParser(
        prog="fedge-hub foundation evaluate", description="Recompute a bundle's quality and rewrite its manifest."
    )
    ap.add_argument("--bundle", default="digits", help="bundled model name or bundle directory")
    return ap


def export_encoders_parser() -> argparse.ArgumentParser:
    """Arguments of `fedge-hub export-encoders`."""
    ap = argparse.ArgumentParser(
        prog="fedge-hub export-encoders",
        description="A Stable Diffusion checkpoint's CLIP encoders as ONNX for the edges: text_encoder.onnx, "
        "tokenizer.json, image_encoder.onnx when the checkpoint has one, and manifest.json (hashes, dimensions, "
        "padding, the hash of the source weights). See hub/foundation/export_encoders.py.",
    )
    ap.add_argument("--model", type=Path, required=True, help="local Stable Diffusion directory (diffusers layout)")
    ap.add_argument("--out", type=Path, required=True, help="where the ONNX encoders and manifest.json go")
    return ap


def cmd_foundation_train(args: argparse.Namespace, command: str) -> int:
    """Train a foundation bundle (torch is imported here, after the arguments are parsed)."""

    size_pools(args.threads or DEFAULT_THREADS, import_torch=True)
    from hub.foundation.train import FoundationError, train_from_args

    try:
        return train_from_args(args, command)
    except FoundationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def cmd_foundation_evaluate(args: argparse.Namespace, command: str) -> int:
    """Recompute a bundle's quality section."""
    from hub.foundation.train import FoundationError, evaluate_from_args

    try:
        return evaluate_from_args(args, command)
    except (FoundationError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def cmd_export_encoders(args: argparse.Namespace) -> int:
    """Export a checkpoint's CLIP encoders and print what the manifest says about them."""
    from hub.foundation.export_encoders import export_encoders

    manifest = export_encoders(args.model, args.out)
    print(json.dumps({k: manifest[k] for k in ("text", "image") if k in manifest}, indent=1))
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    """`fedge-hub evaluate`: fedge and the baselines on one's own folders (bench/folders.py, in a source checkout)."""
    root = Path(__file__).resolve().parent.parent  # bench/ is not installed: take it from the checkout hub/ is in
    if (root / "bench" / "folders.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from bench.folders import main as evaluate_main
    except ModuleNotFoundError as err:
        if err.name not in ("bench", "bench.folders"):
            raise
        print("error: fedge-hub evaluate runs bench/folders.py, which only a source checkout of fedge has "
              "(pip install -e .)", file=sys.stderr)  # fmt: skip
        return 2
    return evaluate_main(argv, prog="fedge-hub evaluate")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedge-hub`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        return cmd_evaluate(argv[1:])
    if argv[:1] == ["export-encoders"]:
        return cmd_export_encoders(export_encoders_parser().parse_args(argv[1:]))
    if argv[:1] == ["demo-data"]:
        from hub.demo import data_main

        return data_main(argv[1:])
    if argv[:1] == ["demo"]:
        from hub.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:2] == ["foundation", "train"]:
        args = foundation_train_parser().parse_args(argv[2:])
        return cmd_foundation_train(args, "fedge-hub foundation train " + " ".join(argv[2:]))
    if argv[:2] == ["foundation", "evaluate"]:
        args = foundation_evaluate_parser().parse_args(argv[2:])
        return cmd_foundation_evaluate(args, "fedge-hub foundation evaluate " + " ".join(argv[2:]))
    if argv[:2] == ["foundation", "general"]:
        from hub.foundation.general import main as general_main

        return general_main(argv[2:])
    ap = argparse.ArgumentParser(prog="fedge-hub", description="fedge hub: synthesize from prototypes, train, unlearn")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fnd = sub.add_parser(
        "foundation",
        help="foundation model commands: `fedge-hub foundation train --help`; `foundation general --help` builds "
        "the general edge encoder (docs/general-encoder.md)",
    )
    fnd.add_argument("action", choices=["train", "evaluate", "general"])
    sub.add_parser("demo", help="broker, hub and three sites, one round, offline: `fedge-hub demo --help`")
    sub.add_parser(
        "export-encoders",
        help="Stable Diffusion's CLIP encoders to ONNX for the edges: `fedge-hub export-encoders --help`",
    )
    sub.add_parser("demo-data", help="write the demo sites' data folders: `fedge-hub demo-data --help`")
    sub.add_parser("evaluate", help="fedge and the baselines on your own folders: `fedge-hub evaluate --help`")
    tr = sub.add_parser("train", help="run one round from contribution JSON files")
    tr.add_argument("contributions", nargs="+", type=Path)
    tr.add_argument("--bundle", default="digits")
    tr.add_argument("--models", type=Path, default=Path("var/hub/models"))
    tr.add_argument("--cache", type=Path, default=Path("var/hub/synthesis-cache"))
    tr.add_argument("--samples-per-count", type=float, default=2.0)
    tr.add_argument("--epochs", type=int, default=30)
    tr.add_argument("--seed", type=int, default=0)
    add_threads_argument(tr)
    tr.set_defaults(fn=cmd_train)
    run = sub.add_parser("run", help="run a hub worker (config: --config YAML and FEDGE_HUB_* variables)")
    run.add_argument("--config", type=Path, help="YAML file; environment variables FEDGE_HUB_* override it")
    run.add_argument("--validate-config", action="store_true", help="check the configuration, print it and exit")
    run.add_argument("--log-level", default="INFO")
    add_threads_argument(run)
    run.set_defaults(fn=cmd_run)
    rnd = sub.add_parser("round", help="`fedge-hub round start`: ask the running hub for a round now")
    rnd.add_argument("action", choices=["start"])
    rnd.add_argument("--config", type=Path)
    rnd.set_defaults(fn=cmd_round)
    st = sub.add_parser("status", help="contributions, rounds, rejections and evaluations from the ledger")
    st.add_argument("--config", type=Path)
    st.set_defaults(fn=cmd_status)
    fr = sub.add_parser("framu", help="`framu status`, `framu pin ID`, `framu unpin ID` (docs/framu.md)")
    fr.add_argument("action", choices=["status", "pin", "unpin"])
    fr.add_argument("subject", nargs="?", help="pin/unpin: a contribution id or a site id")
    fr.add_argument("--note", help="pin: why (kept in the audit trail)")
    fr.add_argument("--config", type=Path)
    fr.set_defaults(fn=cmd_framu)
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
