"""`fedge-edge`: the site side. Never imports torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from contract.layout import load_images, scan


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode a data folder and write the contribution a site would publish."""
    from edge.contribution import make_contribution
    from edge.encoder import choose_encoder

    samples = scan(args.data)
    if not samples:
        print(f"error: no samples under {args.data} (expected <label>/<sample_id>.png|jpg|npy)", file=sys.stderr)
        return 2
    images = load_images(samples)
    import bundled

    bundle = bundled.resolve(args.bundle)
    size = int(json.loads((bundle / "manifest.json").read_text())["image_size"])
    if images.shape[-2:] != (size, size):
        print(
            f"error: images are {images.shape[-2]}x{images.shape[-1]}, encoder expects {size}x{size}", file=sys.stderr
        )
        return 2
    choice = choose_encoder(bundle, images[:64])
    emb = choice.encoder.encode(images)
    contribution = make_contribution(
        args.site_id, choice.encoder_id, emb, [s.label for s in samples], k=args.k, min_group_size=args.min_group_size
    )
    payload = contribution.to_json_bytes()
    args.out.write_bytes(payload)
    print(json.dumps({"samples": len(samples), "bytes": len(payload), "labels": len(contribution.labels),
                      "contribution_id": contribution.contribution_id, "encoder": choice.status()}, indent=1))  # fmt: skip
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify images with a delivered global model: `--model FILE` (manifest.json beside it) or the installed one."""
    from contract.layout import read_image
    from edge.models import GlobalModel, ModelStore

    if args.model is not None:
        model = GlobalModel.from_file(args.model)
    else:
        from edge.config import EdgeSettings
        from runtime.settings import validate_or_exit

        settings = validate_or_exit(EdgeSettings, args.config, False)
        current = ModelStore(settings.state_dir / "models").current()
        if current is None:
            print(f"error: no model installed under {settings.state_dir / 'models'} yet", file=sys.stderr)
            return 2
        model = GlobalModel.from_manifest(*current)
    images = np.stack([read_image(Path(p)) for p in args.paths])[:, None]
    for p, label in zip(args.paths, model.predict(images), strict=True):
        print(f"{p}\t{label}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the site service until SIGTERM or Ctrl-C."""
    import logging

    from edge.config import EdgeSettings
    from edge.service import EdgeService
    from runtime.httpd import run_service
    from runtime.settings import validate_or_exit

    settings = validate_or_exit(EdgeSettings, args.config, args.validate_config)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_service(EdgeService(settings), settings, logging.getLogger("fedge.edge"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedge-edge`."""
    ap = argparse.ArgumentParser(prog="fedge-edge", description="fedge site: encode local data, publish prototypes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    enc = sub.add_parser("encode", help="encode a data folder into a contribution JSON file")
    enc.add_argument("--data", type=Path, required=True, help="folder <label>/<sample_id>.<png|jpg|npy>")
    enc.add_argument("--site-id", required=True)
    enc.add_argument("--bundle", default="digits", help="bundled model name or bundle directory")
    enc.add_argument("--k", type=int, default=4, help="prototypes per label (1 = class level)")
    enc.add_argument("--min-group-size", type=int, default=5, help="fewest samples one prototype may average")
    enc.add_argument("--out", type=Path, required=True)
    enc.set_defaults(fn=cmd_encode)
    pred = sub.add_parser("predict", help="classify images with the delivered global model")
    pred.add_argument("--model", type=Path, help="model.onnx with manifest.json beside it (default: the installed one)")
    pred.add_argument("--config", type=Path, help="site config YAML (to find the installed model)")
    pred.add_argument("paths", nargs="+")
    pred.set_defaults(fn=cmd_predict)
    run = sub.add_parser("run", help="run the site service (config: --config YAML and FEDGE_EDGE_* variables)")
    run.add_argument("--config", type=Path, help="YAML file; environment variables FEDGE_EDGE_* override it")
    run.add_argument("--validate-config", action="store_true", help="check the configuration, print it and exit")
    run.add_argument("--log-level", default="INFO")
    run.set_defaults(fn=cmd_run)
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
