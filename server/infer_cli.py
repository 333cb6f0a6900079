"""``optic infer``: send images to a running server, print the answers, optionally draw them."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

TASKS = {"classify": "classifier", "detect": "detector", "segment": "segmenter", "caption": "captioner"}


def add_arguments(p: argparse.ArgumentParser, default_url: str) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--task", choices=tuple(TASKS), default="classify")
    p.add_argument("--url", default=default_url, help="server host:port")
    p.add_argument("--model", help="model name (default: the task's default model)")
    p.add_argument("--top-k", type=int, default=5, help="classify: labels to show")
    p.add_argument("--conf", type=float, help="detect: confidence threshold (default: the model's)")
    p.add_argument("--iou", type=float, help="detect: NMS IoU threshold (default: the model's)")
    p.add_argument("--beam-size", type=int, help="caption: beam search width (default: greedy)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--save-vis", type=Path, metavar="DIR", help="write each image annotated as DIR/<name>.png")
    add_credentials_arguments(p)


def add_credentials_arguments(p: argparse.ArgumentParser) -> None:
    """Flags to reach a server started with --tls-cert, --tls-client-ca or --auth-token-file."""
    g = p.add_argument_group("security")
    g.add_argument("--tls", action="store_true", help="connect over TLS (system roots unless --tls-ca)")
    g.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signed the server's certificate (implies --tls)")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="mutual TLS: client certificate chain")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="mutual TLS: client private key")
    g.add_argument("--token-file", type=Path, metavar="FILE", help="bearer token (first line of the file)")


def credentials_of(args: argparse.Namespace) -> object:
    """``server.client.Credentials`` from the flags; OSError if a file cannot be read."""
    from server.client import Credentials

    token = None
    if args.token_file is not None:
        lines = [t.strip() for t in args.token_file.read_text().splitlines() if t.strip()]
        token = lines[0] if lines else None
    return Credentials(args.tls, args.tls_ca, args.tls_cert, args.tls_key, token)


def run(args: argparse.Namespace) -> int:
    import grpc

    from server.client import VisionClient

    model = args.model or TASKS[args.task]
    results: dict[str, object] = {}
    try:
        credentials = credentials_of(args)
    except OSError as exc:
        print(f"optic infer: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with VisionClient(args.url, timeout=args.timeout, credentials=credentials) as client:  # type: ignore[arg-type]
        for image in args.images:
            try:
                data = Path(image).read_bytes()
                results[image] = _ask(client, args, model, data)
            except OSError as exc:
                print(f"optic infer: {image}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            except grpc.RpcError as exc:
                print(f"optic infer: {image}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            if args.save_vis:
                path = _save(args, image, data, results[image])
                print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: _jsonable(v) for k, v in results.items()}, indent=2))
    else:
        for image, result in results.items():
            print(image)
            print(_table(args.task, result))
    return 0


def _ask(client: object, args: argparse.Namespace, model: str, data: bytes) -> object:
    if args.task == "classify":
        return client.classify(data, model=model, top_k=args.top_k)  # type: ignore[attr-defined]
    if args.task == "detect":
        options = {k: v for k, v in (("confidence_threshold", args.conf), ("iou_threshold", args.iou)) if v is not None}
        return client.detect(data, model=model, **options)  # type: ignore[attr-defined]
    if args.task == "segment":
        return client.segment(data, model=model)  # type: ignore[attr-defined]
    return client.caption(data, model=model, beam_size=args.beam_size)  # type: ignore[attr-defined]


def _table(task: str, result: object) -> str:
    if task == "classify":
        return "\n".join(f"  {x.score:7.4f}  {x.label} ({x.class_id})" for x in result)  # type: ignore[attr-defined]
    if task == "detect":
        rows = [
            f"  {d.score:7.4f}  {d.label:12s} ({d.class_id})  [{', '.join(f'{v:.1f}' for v in d.box)}]"
            for d in result  # type: ignore[attr-defined]
        ]
        return "\n".join(rows) or "  (nothing detected)"
    if task == "segment":
        total = sum(result.pixel_counts.values())  # type: ignore[attr-defined]
        return "\n".join(
            f"  {n / total:7.2%}  {result.labels[c]} ({c})"  # type: ignore[attr-defined]
            for c, n in sorted(result.pixel_counts.items())  # type: ignore[attr-defined]
        )
    return f"  {result.text}  (log p = {result.log_prob:.3f})"  # type: ignore[attr-defined]


def _jsonable(result: object) -> object:
    if isinstance(result, list):
        return [asdict(x) for x in result]
    out = asdict(result)  # type: ignore[call-overload]
    if "mask" in out:
        out["mask"] = {"shape": list(result.mask.shape)}  # type: ignore[attr-defined]
        out["labels"] = {str(k): v for k, v in out["labels"].items()}
        out["pixel_counts"] = {str(k): v for k, v in out["pixel_counts"].items()}
        out["rle"] = {str(k): list(v) for k, v in out["rle"].items()}
    return out


def _save(args: argparse.Namespace, image: str, data: bytes, result: object) -> Path:
    from server import visualize

    img = visualize.load(data)
    if args.task == "classify":
        out = visualize.labels(img, result)  # type: ignore[arg-type]
    elif args.task == "detect":
        out = visualize.boxes(img, result)  # type: ignore[arg-type]
    elif args.task == "segment":
        out = visualize.mask_overlay(img, result)  # type: ignore[arg-type]
    else:
        out = visualize.with_caption(img, result.text)  # type: ignore[attr-defined]
    args.save_vis.mkdir(parents=True, exist_ok=True)
    path = args.save_vis / f"{Path(image).stem}.{args.task}.png"
    out.save(path)
    return path
