"""``optic infer``: send images to a running server, print the answers, optionally draw them.

The task comes from the model (Vision ModelMetadata) unless ``--task`` names
it; everything task-specific (request options, the printed table, the JSON,
the drawing) comes from the task's module.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from optic.client.vision import Credentials, VisionClient
from optic.server.metadata import TASK_NAMES
from optic.server.tasks import TASKS, task_named
from optic.server.tasks.base import Task
from optic.server.tasks.draw import load


def add_arguments(p: argparse.ArgumentParser, default_url: str) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument(
        "--task",
        choices=(*TASK_NAMES, *TASK_NAMES.values()),
        help="the task (default: the model's own, asked from the server; without --model: classify)",
    )
    p.add_argument("--url", default=default_url, help="server host:port")
    p.add_argument("--model", help="model name (default: the task's default model)")
    p.add_argument("--model-version", default="", help="model version (default: the model's latest)")
    seen: set[str] = set()
    for task in TASKS.values():
        for option in task.options:
            if option.flag not in seen:
                seen.add(option.flag)
                p.add_argument(option.flag, dest=option.field, type=option.type, help=f"{task.name}: {option.help}")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--save-vis", type=Path, metavar="DIR", help="write each image annotated as DIR/<name>.<task>.png")
    add_credentials_arguments(p)


def add_credentials_arguments(p: argparse.ArgumentParser) -> None:
    """Flags to reach a server started with --tls-cert, --tls-client-ca or --auth-token-file."""
    g = p.add_argument_group("security")
    g.add_argument("--tls", action="store_true", help="connect over TLS (system roots unless --tls-ca)")
    g.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signed the server's certificate (implies --tls)")
    g.add_argument("--tls-cert", type=Path, metavar="PEM", help="mutual TLS: client certificate chain")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="mutual TLS: client private key")
    g.add_argument("--token-file", type=Path, metavar="FILE", help="bearer token (first line of the file)")


def credentials_of(args: argparse.Namespace) -> Credentials:
    """The flags as credentials; OSError if a file cannot be read."""
    token = None
    if args.token_file is not None:
        lines = [t.strip() for t in args.token_file.read_text().splitlines() if t.strip()]
        token = lines[0] if lines else None
    return Credentials(args.tls, args.tls_ca, args.tls_cert, args.tls_key, token)


def _task_and_model(args: argparse.Namespace, client: VisionClient) -> tuple[Task, str]:
    if args.task:
        task = task_named(args.task)
        return task, args.model or task.default_model
    if not args.model:
        return TASKS["classify"], TASKS["classify"].default_model
    info = client.model_info(args.model, args.model_version)
    if info.task not in TASKS:
        raise ValueError(f"model {args.model!r} has no vision task (it is a plain tensor model); use the KServe API")
    return TASKS[info.task], args.model


def run(args: argparse.Namespace) -> int:
    """Every image is tried; a bad one prints its error line, the rest their answers; exit 1 if any failed."""
    import grpc

    try:
        credentials = credentials_of(args)
    except OSError as exc:
        print(f"optic infer: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    results: dict[str, object] = {}
    failed = 0
    with VisionClient(args.url, timeout=args.timeout, credentials=credentials) as client:
        try:
            task, model = _task_and_model(args, client)
        except grpc.RpcError as exc:
            print(f"optic infer: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"optic infer: {exc}", file=sys.stderr)
            return 2
        options: dict[str, Any] = {
            o.field: getattr(args, o.field) for o in task.options if getattr(args, o.field, None) is not None
        }
        for image in args.images:
            try:
                data = Path(image).read_bytes()
                result = client.call(task.name, [data], model, args.model_version, **options)[0]
            except OSError as exc:
                print(f"optic infer: {image}: {exc.strerror or exc}", file=sys.stderr)
                failed += 1
                continue
            except grpc.RpcError as exc:
                print(f"optic infer: {image}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                failed += 1
                continue
            results[image] = result
            if args.save_vis:
                args.save_vis.mkdir(parents=True, exist_ok=True)
                path = args.save_vis / f"{Path(image).stem}.{task.name}.png"
                task.draw(load(data), result).save(path)
                print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: task.to_json(v) for k, v in results.items()}, indent=2))
    else:
        for image, result in results.items():
            print(image)
            print(task.render(result))
    return 1 if failed else 0
