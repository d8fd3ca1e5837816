"""The client commands of ``protoserve`` (``collections``, ``register``, ``classify``).

``add_client_commands(sub)`` adds them to ``server.cli``'s subparsers. Every command takes
``--server HOST:PORT`` and, on a failed call, prints the server's message to stderr and
returns 1 (argparse usage errors exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from server.client import (
    DEFAULT_TARGET,
    METHODS,
    METRICS,
    Collection,
    ImageResult,
    ProtoserveClient,
    ProtoserveError,
)

__all__ = ["CLASSIFY_CHUNK", "add_client_commands", "result_json"]

CLASSIFY_CHUNK = 32  # images per Classify request


def _client(args: argparse.Namespace) -> ProtoserveClient:
    return ProtoserveClient(args.server, timeout_s=args.timeout)


def _run(name: str, fn: Callable[[argparse.Namespace, ProtoserveClient], int]) -> Any:
    """Wraps a command: opens the client, turns ``ProtoserveError`` into stderr + exit 1."""

    def command(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return fn(args, client)
        except ProtoserveError as e:
            print(f"protoserve {name}: {e.code}: {e.message}", file=sys.stderr)
            return 1

    return command


def _fmt(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


def result_json(image: str, r: ImageResult) -> dict[str, Any]:
    """One line of ``protoserve classify --json``."""
    return {
        "image": image,
        "predictions": [
            {"label": p.label, "score": _fmt(p.score), "probability": _fmt(p.probability)}
            for p in r.predictions
        ],
        "entropy": _fmt(r.entropy),
        "margin": _fmt(r.margin),
        "unknown": r.unknown,
    }


def _describe(c: Collection) -> str:
    threshold = f", threshold {c.threshold:g}" if c.threshold else ""
    return (
        f"{c.name}: model {c.model}, {c.method}/{c.metric}{threshold}, "
        f"{c.class_count} classes, {c.support_count} supports"
    )


# -- commands -----------------------------------------------------------------------------------
def _create(args: argparse.Namespace, client: ProtoserveClient) -> int:
    c = client.create_collection(
        args.name, args.model, method=args.method, metric=args.metric, threshold=args.threshold
    )
    print(json.dumps(vars(c)) if args.json else f"created {_describe(c)}")
    return 0


def _list(args: argparse.Namespace, client: ProtoserveClient) -> int:
    colls = client.list_collections()
    if args.json:
        for c in colls:
            print(json.dumps(vars(c)))
    elif not colls:
        print("no collections")
    else:
        for c in colls:
            print(_describe(c))
    return 0


def _get(args: argparse.Namespace, client: ProtoserveClient) -> int:
    c = client.get_collection(args.name)
    if args.json:
        print(json.dumps(vars(c)))
        return 0
    print(_describe(c))
    for info in client.list_classes(args.name):
        print(f"  {info.label}: {info.image_supports} images, {info.text_supports} texts")
    return 0


def _delete(args: argparse.Namespace, client: ProtoserveClient) -> int:
    for name in args.names:
        client.delete_collection(name)
        print(f"deleted {name}")
    return 0


def _register(args: argparse.Namespace, client: ProtoserveClient) -> int:
    if not args.images and not args.texts:
        print("protoserve register: give IMAGE... and/or --text", file=sys.stderr)
        return 2
    reg = client.register(
        args.collection,
        args.label,
        images=args.images,
        texts=args.texts,
        template_set=args.template_set or "",
    )
    info = reg.class_info
    if args.json:
        print(
            json.dumps(
                {
                    "label": info.label,
                    "image_supports": info.image_supports,
                    "text_supports": info.text_supports,
                    "added_support_ids": list(reg.added_support_ids),
                }
            )
        )
    else:
        print(
            f"{args.collection}/{info.label}: added {len(reg.added_support_ids)} supports "
            f"(now {info.image_supports} images, {info.text_supports} texts)"
        )
    return 0


def _chunks(items: Sequence[str], n: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _classify(args: argparse.Namespace, client: ProtoserveClient) -> int:
    offset = 0
    # transductive: the images refine the prototypes together, so they go in one request
    size = len(args.images) if args.transductive else CLASSIFY_CHUNK
    for chunk in _chunks(args.images, size):
        try:
            results = client.classify(
                args.collection,
                chunk,
                top_k=args.top_k,
                method=args.method,
                transductive=args.transductive,
            )
        except ProtoserveError as e:
            raise _name_image(e, chunk, offset) from None
        for path, r in zip(chunk, results, strict=True):
            if args.json:
                print(json.dumps(result_json(path, r)), flush=True)
            else:
                top = r.predictions[0] if r.predictions else None
                head = "unknown" if r.unknown or top is None else top.label
                rest = ", ".join(f"{p.label} {p.probability:.3f}" for p in r.predictions)
                print(f"{path}: {head}  [{rest}]  entropy {r.entropy:.3f} margin {r.margin:.3f}")
        offset += len(chunk)
    return 0


def _name_image(e: ProtoserveError, chunk: Sequence[str], offset: int) -> ProtoserveError:
    """The server names images by index within the request ("image 3: ..."); add the path."""
    msg = e.message
    if e.code == "INVALID_ARGUMENT" and msg.startswith("image "):
        head = msg[len("image ") :].split(":", 1)[0]
        if head.isdigit() and int(head) < len(chunk):
            i = int(head)
            return ProtoserveError(e.code, f"{chunk[i]} (image {offset + i}): {msg}")
    return e


# -- wiring -------------------------------------------------------------------------------------
def add_client_commands(sub: Any) -> None:
    """Adds ``collections``, ``register`` and ``classify`` to ``protoserve``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the protoserve server (default {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--timeout", type=float, default=60.0, help="deadline per call, seconds (default 60)"
    )
    common.add_argument("--json", action="store_true", help="one JSON object per line")

    colls = sub.add_parser("collections", help="create, list, show or delete collections")
    colls_sub = colls.add_subparsers(dest="action", required=True)
    create = colls_sub.add_parser("create", parents=[common], help="create a collection")
    create.add_argument("name")
    create.add_argument("--model", required=True, help="a model in the server's repository")
    create.add_argument("--method", choices=METHODS, help="default: the model's")
    create.add_argument("--metric", choices=METRICS, help="default: the model's")
    create.add_argument(
        "--threshold", type=float, help="open-set threshold on the top-1 probability"
    )
    create.set_defaults(func=_run("collections create", _create))
    lst = colls_sub.add_parser("list", parents=[common], help="list the collections")
    lst.set_defaults(func=_run("collections list", _list))
    get = colls_sub.add_parser("get", parents=[common], help="show a collection and its classes")
    get.add_argument("name")
    get.set_defaults(func=_run("collections get", _get))
    delete = colls_sub.add_parser("delete", parents=[common], help="delete collections")
    delete.add_argument("names", nargs="+", metavar="NAME")
    delete.set_defaults(func=_run("collections delete", _delete))

    reg = sub.add_parser(
        "register", parents=[common], help="create a class or add supports (images, texts)"
    )
    reg.add_argument("--collection", required=True)
    reg.add_argument("--class", dest="label", required=True, metavar="LABEL")
    reg.add_argument("images", nargs="*", metavar="IMAGE", help="support image files")
    reg.add_argument(
        "--text", dest="texts", action="append", default=[], help="a text prompt (repeatable)"
    )
    reg.add_argument("--template-set", help="zero-shot template set for --text supports")
    reg.set_defaults(func=_run("register", _register))

    cls = sub.add_parser("classify", parents=[common], help="classify images")
    cls.add_argument("--collection", required=True)
    cls.add_argument("images", nargs="+", metavar="IMAGE")
    cls.add_argument("--top-k", type=int, help="predictions per image (default 5)")
    cls.add_argument("--method", choices=METHODS, help="override the collection's method")
    cls.add_argument(
        "--transductive",
        action="store_true",
        help="prototype method: all the images, sent in one request, refine the class "
        "prototypes before they are scored (helps when they are many images of the classes)",
    )
    cls.set_defaults(func=_run("classify", _classify))
