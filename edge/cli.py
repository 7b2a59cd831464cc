"""`fedge-edge`: the site side. Never imports torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from contract.layout import load_images, scan


def resolve_bundle(name_or_path: str) -> Path:
    """A bundled model name (digits, mnist) or a bundle directory."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    import bundled

    return bundled.path(name_or_path)


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode a data folder and write the contribution a site would publish."""
    from edge.contribution import make_contribution
    from edge.encoder import choose_encoder

    samples = scan(args.data)
    if not samples:
        print(f"error: no samples under {args.data} (expected <label>/<sample_id>.png|jpg|npy)", file=sys.stderr)
        return 2
    images = load_images(samples)
    bundle = resolve_bundle(args.bundle)
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
    """Classify images with a delivered global model (ONNX + manifest beside it)."""
    import onnxruntime as ort

    from contract.layout import read_image

    manifest = json.loads((args.model.parent / "manifest.json").read_text())
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    x = np.stack([read_image(Path(p)) for p in args.paths])[:, None].astype(np.float32)
    logits = session.run(None, {"image": x})[0]
    for path, i in zip(args.paths, logits.argmax(1), strict=True):
        print(f"{path}\t{manifest['labels'][int(i)]}")
    return 0


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
    pred = sub.add_parser("predict", help="classify images with a global model")
    pred.add_argument("--model", type=Path, required=True, help="model.onnx with manifest.json beside it")
    pred.add_argument("paths", nargs="+")
    pred.set_defaults(fn=cmd_predict)
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
