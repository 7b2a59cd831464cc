"""`fedge-edge`: the site side. Never imports torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from contract.layout import LocalSample, fit_image, read_image, scan


def read_fitted(samples: list[LocalSample], size: int) -> tuple[list[LocalSample], np.ndarray, int]:
    """(readable samples, their images [N, 1, size, size], how many were resized), as the edge service reads them.

    Luminance (contract.layout.read_image), then the whole image resized to the encoder's input
    (contract.layout.fit_image); a file that cannot be read is named on stderr and skipped.
    """
    kept, images, resized = [], [], 0
    for s in samples:
        try:
            im = read_image(s.path)
            if im.shape != (size, size):
                im = fit_image(im, size)
                resized += 1
        except (OSError, ValueError) as err:
            print(f"warning: skipping {s.path}: {err}", file=sys.stderr)
            continue
        kept.append(s)
        images.append(im)
    return kept, (np.stack(images)[:, None] if images else np.zeros((0, 1, size, size), np.float32)), resized


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode a data folder and write the contribution a site would publish."""
    from edge.contribution import make_contribution
    from edge.encoder import choose_encoder

    found = scan(args.data)
    if not found:
        print(f"error: no samples under {args.data} (expected <label>/<sample_id>.png|jpg|npy)", file=sys.stderr)
        return 2
    import bundled

    bundle = bundled.resolve(args.bundle)
    size = int(json.loads((bundle / "manifest.json").read_text())["image_size"])
    samples, images, resized = read_fitted(found, size)
    if not samples:
        print(f"error: none of the {len(found)} files under {args.data} could be read as an image", file=sys.stderr)
        return 2
    choice = choose_encoder(bundle, images[:64])
    emb = choice.encoder.encode(images)
    contribution = make_contribution(
        args.site_id, choice.encoder_id, emb, [s.label for s in samples], k=args.k, min_group_size=args.min_group_size
    )
    payload = contribution.to_json_bytes()
    args.out.write_bytes(payload)
    print(json.dumps({"samples": len(samples), "resized": resized, "skipped": len(found) - len(samples),
                      "bytes": len(payload), "labels": len(contribution.labels),
                      "contribution_id": contribution.contribution_id, "encoder": choice.status()}, indent=1))  # fmt: skip
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify images with a delivered global model: `--model FILE` (manifest.json beside it) or the installed one."""
    from edge.models import GlobalModel, ModelStore

    if args.model is not None:
        model = GlobalModel.from_file(args.model)
    else:
        from edge.config import EdgeSettings
        from runtime.settings import validate_or_exit

        settings = validate_or_exit(EdgeSettings, args.config, False)
        current = ModelStore(settings.state_dir / "models").serving()
        if current is None:
            print(f"error: no model served under {settings.state_dir / 'models'} yet (none installed, or the "
                  "hub's delivery gate has not passed one: docs/delivery-gate.md)", file=sys.stderr)  # fmt: skip
            return 2
        model = GlobalModel.from_manifest(*current)
    images = np.stack([fit_image(read_image(Path(p)), model.image_size) for p in args.paths])[:, None]
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


def cmd_keygen(args: argparse.Namespace) -> int:
    """Make an Ed25519 key pair: the private key (mode 0600) and its public half beside it (.pub.pem)."""
    from contract import signing

    out = Path(args.out)
    pub = out.with_suffix(".pub.pem")
    if out.exists() or pub.exists():
        print(f"error: {out if out.exists() else pub} exists; keys are never overwritten", file=sys.stderr)
        return 2
    key = signing.write_keypair(out, pub)
    print(f"key id {signing.key_id(key.public_key())}\nprivate key {out} (keep it secret)\npublic key {pub}")
    return 0


def _selector(args: argparse.Namespace) -> dict:
    """The selector the forget flags ask for; ValueError unless exactly one kind is given."""
    from contract.payloads import ForgetSelector

    kinds = [k for k, given in (("samples", args.samples), ("label", args.label),
                                ("time_window", args.since or args.until), ("all", args.all)) if given]  # fmt: skip
    if len(kinds) != 1:
        raise ValueError("give exactly one of --samples, --label, --since/--until or --all")
    sel: dict = {"kind": kinds[0]}
    if args.samples:
        sel["sample_ids"] = [x.strip() for x in args.samples.split(",") if x.strip()]
    if args.label:
        sel["label"] = args.label
    for name in ("since", "until"):
        if getattr(args, name):
            sel[name] = getattr(args, name)
    return ForgetSelector.model_validate(sel).model_dump(mode="json", exclude_none=True)


def _broker(args: argparse.Namespace):
    """Broker settings from the flags, or from a site's config (--config) with the flags on top."""
    from runtime.mqtt import BrokerSettings, TlsSettings

    fields: dict = {}
    if args.config is not None:
        from edge.config import EdgeSettings
        from runtime.settings import load_settings

        fields = load_settings(EdgeSettings, args.config).broker.model_dump(exclude_none=True)
    for flag, key in (("broker_host", "host"), ("broker_port", "port"), ("username", "username"),
                      ("password_file", "password_file")):  # fmt: skip
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    if args.password_file is not None:
        fields.pop("password", None)
    if args.ca_file is not None:
        fields["tls"] = TlsSettings(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    return BrokerSettings(**fields)


def cmd_forget(args: argparse.Namespace) -> int:
    """Sign and publish a forget request for one site; with --wait-receipt, wait for its receipt or refusal."""
    import queue
    import time

    from pydantic import ValidationError

    from contract import signing
    from contract.payloads import ErrorReport, ForgetReceipt, ForgetRequest, new_id, now
    from contract.topics import DEFAULT_PREFIX, Topics
    from runtime.mqtt import Bus, NotConnected

    key = signing.load_private_key(args.key)
    body = {
        "schema_version": 1, "request_id": new_id(), "site_id": args.site, "selector": _selector(args),
        "reason": args.reason, "issued_at": now().isoformat(), "issuer": args.issuer,
    }  # fmt: skip
    signed = signing.sign(body, key)
    request = ForgetRequest.model_validate(signed)
    payload = json.dumps(signed, separators=(",", ":"), ensure_ascii=False).encode()
    prefix = args.topic_prefix
    if prefix is None and args.config is not None:
        from edge.config import EdgeSettings
        from runtime.settings import load_settings

        prefix = load_settings(EdgeSettings, args.config).topic_prefix
    topics = Topics(prefix or DEFAULT_PREFIX)
    answers: queue.Queue[tuple[str, bytes]] = queue.Queue()
    bus = Bus(f"fedge-forget-{request.request_id[:12]}", _broker(args), persistent=False)
    if args.wait_receipt is not None:  # subscribed before the request goes out, so the answer cannot be missed
        for kind in ("forget/receipt", "errors"):
            bus.subscribe(topics.site(args.site, kind), lambda m, k=kind: answers.put((k, m.payload)))
    bus.start()
    try:
        if not bus.wait_connected(args.connect_timeout):
            print(f"error: no connection to the broker {bus.broker.host}:{bus.broker.port}", file=sys.stderr)
            return 3
        t0 = time.monotonic()
        try:
            bus.publish(topics.site(args.site, "forget/request"), payload, retain=False)
        except NotConnected as err:
            print(f"error: the request was not published: {err}", file=sys.stderr)
            return 3
        print(f"request {request.request_id} published ({len(payload)} bytes)", flush=True)
        if args.wait_receipt is None:
            return 0
        deadline = t0 + args.wait_receipt
        while (left := deadline - time.monotonic()) > 0:
            try:
                kind, raw = answers.get(timeout=left)
            except queue.Empty:
                break
            took_ms = (time.monotonic() - t0) * 1000
            try:
                if kind == "errors":
                    report = ErrorReport.model_validate_json(raw)
                    if report.ref_id != request.request_id:
                        continue
                    print(f"refused after {took_ms:.0f} ms: {report.code}: {report.reason}", file=sys.stderr)
                    return 1
                receipt_body = json.loads(raw)
                receipt = ForgetReceipt.model_validate(receipt_body)
            except (ValidationError, ValueError):
                continue  # not an answer to this request
            if receipt.request_id != request.request_id:
                continue
            site_key = signing.parse_public_pem(receipt.public_key)
            trusted = {signing.key_id(site_key): site_key}
            if args.site_public_key is not None:
                pinned = signing.load_public_key(args.site_public_key)
                trusted = {signing.key_id(pinned): pinned}
            try:
                kid = signing.verify(receipt_body, trusted)
            except signing.SignatureError as err:
                print(f"error: the receipt's signature does not verify: {err}", file=sys.stderr)
                return 1
            print(json.dumps(receipt_body, indent=1))
            print(f"receipt {receipt.receipt_id} signed by site key {kid}: {receipt.samples_deleted} samples deleted; "
                  f"request to receipt {took_ms:.0f} ms", flush=True)  # fmt: skip
            return 0
        print(f"error: no receipt within {args.wait_receipt:.0f} s (the request is durable at the site once received; "
              "a site publishes receipts once it has seen a hub's status)", file=sys.stderr)  # fmt: skip
        return 4
    finally:
        bus.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedge-edge`."""
    ap = argparse.ArgumentParser(prog="fedge-edge", description="fedge site: encode local data, publish prototypes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    enc = sub.add_parser(
        "encode",
        help="encode a data folder into a contribution JSON file (images of any size and colour are converted to "
        "luminance and resized, the whole image, to the encoder's input, as the site service does)",
    )
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
    key = sub.add_parser("keygen", help="make an Ed25519 key pair (operator keys sign forget requests)")
    key.add_argument("--out", type=Path, required=True, help="private key file (PEM, mode 0600); .pub.pem beside it")
    key.set_defaults(fn=cmd_keygen)
    fg = sub.add_parser("forget", help="sign and send a forget request to a site")
    fg.add_argument("--site", required=True, help="site id")
    fg.add_argument("--samples", help="comma-separated sample ids (file stems)")
    fg.add_argument("--label", help="every sample of this label")
    fg.add_argument("--since", help="samples with timestamp >= this ISO 8601 time (with a zone)")
    fg.add_argument("--until", help="samples with timestamp < this ISO 8601 time (with a zone)")
    fg.add_argument("--all", action="store_true", help="every sample of the site")
    fg.add_argument("--reason", required=True, help="why, in words (kept in the audit trail)")
    fg.add_argument("--issuer", required=True, help="who asks (an operator, a data-protection tool)")
    fg.add_argument("--key", type=Path, required=True, help="operator private key (PEM) the site trusts")
    fg.add_argument("--config", type=Path, help="a site config YAML to take the broker settings from")
    fg.add_argument("--broker-host")
    fg.add_argument("--broker-port", type=int)
    fg.add_argument("--username")
    fg.add_argument("--password-file", type=Path)
    fg.add_argument("--ca-file", type=Path, help="CA (PEM) for TLS to the broker")
    fg.add_argument("--cert-file", type=Path, help="client certificate (PEM) for mutual TLS")
    fg.add_argument("--key-file", type=Path, help="key of the client certificate")
    fg.add_argument("--topic-prefix", help="topic prefix (default: the site config's, else fedge/v1)")
    fg.add_argument("--connect-timeout", type=float, default=10.0)
    fg.add_argument("--wait-receipt", type=float, metavar="SECONDS", help="wait this long for the signed receipt")
    fg.add_argument("--site-public-key", type=Path, help="check the receipt against this site key (PEM)")
    fg.set_defaults(fn=cmd_forget)
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
