"""``protoserve train ...``: meta-train, evaluate, score the one-shot runs, export.

    protoserve train metatrain --out runs/protonet --episodes 300
    protoserve train evaluate --checkpoint runs/protonet/checkpoint.pt --way 20
    protoserve train eval-runs --model models/omniglot-protonet --runs RUNS
    protoserve train export --checkpoint runs/protonet/checkpoint.pt --out models/omniglot-protonet
    protoserve train finetune --mode two-stage --export models/fmnist-ft --server 127.0.0.1:50051
    protoserve train experiment fmnist-selftrain --seed 0 --out runs/fmnist_selftrain

Every command is ``main(argv)``; only ``eval-runs`` works without torch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from training.cli_args import config_from_args, data_args, data_config_from_args, metatrain_args


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _metatrain(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    from training.metatrain import metatrain

    log = metatrain(
        config_from_args(args),
        args.out,
        resume=not args.restart,
        stop_after=args.stop_after,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        progress=not args.no_progress,
        command=args.command_line,
        device=args.device,
    )
    last = log["train"][-1] if log["train"] else {}
    print(
        f"step {log['step']}: train loss {last.get('loss', float('nan')):.4f}, "
        f"{log['seconds']:.0f} s; run folder {log['path']}"
    )
    for v in log["val"][-1:]:
        print(
            f"validation {v['n_way']}-way {v['k_shot']}-shot: {100 * v['acc']:.2f}% "
            f"+- {100 * v['ci95']:.2f}%"
        )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    from training import evaluate as ev

    if (args.checkpoint is None) == (args.model is None):
        print("evaluate: give exactly one of --checkpoint and --model", file=sys.stderr)
        return 2
    sampler = {"within_superclass": args.within_alphabet, "split_drawers": args.split_drawers}
    kw = {
        "n_way": args.way,
        "k_shot": args.shot,
        "q_query": args.query,
        "episodes": args.episodes,
        "seed": args.seed,
        **sampler,
    }
    if args.transductive and args.model is None:
        print("evaluate: --transductive scores an exported --model", file=sys.stderr)
        return 2
    ds, method, encode, metric = _eval_target(args)
    if encode is not None:
        scale = None
        if args.transductive:
            from server.model_repo import load_model

            scale = load_model(args.model).manifest.scoring.logit_scale
        emb = ev.embed_all(ds, encode)
        res = ev.evaluate_embeddings(emb, ds, metric, transductive=scale, **kw)
    else:
        res = ev.evaluate_method(method, ds, progress=not args.no_progress, **kw)
    print(f"{args.split} split, {len(ds.classes)} classes: {res}")
    if args.json:
        print(json.dumps(res.to_dict()))
    return 0


def _eval_target(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """(dataset split, method or None, encoder or None, metric) for ``evaluate``."""
    import numpy as np

    from training import evaluate as ev
    from training.config import TrainConfig, build_data, build_method, load_dataset

    if args.checkpoint is not None:
        from training.checkpoint import load_checkpoint

        state = load_checkpoint(args.checkpoint)
        cfg = TrainConfig.from_dict(state["config"])
        pre = state["preprocess"]
    else:
        from server.model_repo import load_model
        from server.runtimes.onnx_rt import OnnxConfig, OnnxRuntime

        cfg = data_config_from_args(args)
        model = load_model(args.model)
        pre = model.manifest.preprocess
    if args.split == "all":
        ds = load_dataset(cfg, pre)
    else:
        train, val = build_data(cfg, pre)
        ds = val if args.split == "val" else train.with_rotations([0])
    if args.checkpoint is None:
        rt = OnnxRuntime(model, OnnxConfig(intra_op_threads=args.threads))
        return ds, None, lambda x: rt.encode_images(np.asarray(x)), model.manifest.scoring.metric
    method = build_method(cfg, ds.num_channels, ds.size)
    method.load_state_dict(state["model"])
    if cfg.method == "protonet":
        return ds, method, ev.torch_encoder(method), method.metric
    return ds, method, None, method.metric


def _eval_runs(args: argparse.Namespace) -> int:
    from training.runs import eval_runs, report

    runs = args.runs
    if runs is None:
        from training.data.omniglot import data_root

        runs = data_root() / "omniglot" / "sample_run"
    results = eval_runs(args.model, runs, threads=args.threads, transductive=args.transductive)
    print(report(results))
    if args.json:
        print(json.dumps({r.name: r.error for r in results}))
    return 0


def _export(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    from training.export import ExportError
    from training.export_checkpoint import export_checkpoint

    try:
        folder = export_checkpoint(
            args.checkpoint,
            args.out,
            name=args.name,
            overwrite=args.overwrite,
            shift_average=args.shift_average,
            rotate_average=args.rotate_average,
            crop=args.crop,
            ink_margin=args.ink_margin,
        )
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    m = folder.manifest
    print(
        f"exported {m.provenance.architecture} to {folder.path} (dim {m.embedding_dim}, "
        f"metric {m.scoring.metric})"
    )
    return 0


EXPERIMENTS = (
    "fmnist-baseline",
    "fmnist-rotation",
    "fmnist-selftrain",
    "fmnist-active",
    "fmnist-fixmatch",
    "fmnist-ensemble",
)


def _experiment(args: argparse.Namespace) -> int:
    """docs/results.md's experiments: ``training.experiments.<name>.main(rest)``."""
    import importlib

    module = importlib.import_module("training.experiments." + args.name.replace("-", "_"))
    return int(module.main(args.rest))


def _finetune(rest: Sequence[str]) -> int:
    from training.finetune_cli import main as finetune_main

    return finetune_main(list(rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protoserve train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    mt = sub.add_parser(
        "metatrain",
        help="episodic meta-training (resumes from --out)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    metatrain_args(mt)
    mt.set_defaults(func=_metatrain)

    ev = sub.add_parser(
        "evaluate",
        help="N-way K-shot episodes: accuracy and 95%% interval",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("--checkpoint", help="a metatrain checkpoint.pt (its own data config)")
    ev.add_argument("--model", help="an exported model folder (uses the data flags below)")
    ev.add_argument("--split", default="val", choices=["val", "train", "all"])
    data_args(ev)
    ev.add_argument("--way", type=int, default=5)
    ev.add_argument("--shot", type=int, default=1)
    ev.add_argument("--query", type=int, default=15)
    ev.add_argument("--episodes", type=int, default=1000)
    ev.add_argument("--within-alphabet", action="store_true")
    ev.add_argument("--split-drawers", action="store_true")
    ev.add_argument("--seed", type=int, default=12345)
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--json", action="store_true", help="also print the result as JSON")
    ev.add_argument(
        "--transductive",
        action="store_true",
        help="with --model: refine the prototypes with each episode's queries first, as the "
        "server's Classify option 'transductive' does",
    )
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_evaluate)

    er = sub.add_parser("eval-runs", help="20-way one-shot run folders through the serving path")
    er.add_argument("--model", required=True, help="an exported model folder")
    er.add_argument(
        "--runs",
        help="one run folder or a folder of runs (default: "
        "omniglot/sample_run under the data root)",
    )
    er.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    er.add_argument("--json", action="store_true", help="also print {run: error%%} as JSON")
    er.add_argument(
        "--transductive",
        action="store_true",
        help="refine the prototypes with each run's 20 test images first, as the server's "
        "Classify option 'transductive' does (server/transduction.py)",
    )
    er.set_defaults(func=_eval_runs)

    ex = sub.add_parser("export", help="a checkpoint's backbone -> a servable model folder")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--out", required=True, help="model folder, e.g. models/omniglot-protonet")
    ex.add_argument("--name", help="model name (default: the folder's name)")
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument(
        "--shift-average",
        type=int,
        default=0,
        metavar="PIXELS",
        help="the tower averages its embedding over the 3x3 grid of +-PIXELS shifts (0: off)",
    )
    ex.add_argument(
        "--rotate-average",
        type=float,
        default=0.0,
        metavar="DEGREES",
        help="with --shift-average: also turn each image by -DEGREES, 0, +DEGREES (27 views)",
    )
    ex.add_argument(
        "--crop",
        choices=["none", "ink"],
        help="the served crop, if not the training data's ('ink': the square around a drawing)",
    )
    ex.add_argument(
        "--ink-margin",
        type=float,
        help="with --crop ink: margin on each side, a fraction of the drawing's side (0.15)",
    )
    ex.add_argument("--threads", type=int, default=1)
    ex.set_defaults(func=_export)

    ft = sub.add_parser(
        "finetune",
        help="transfer learning: linear probe / full / two-stage, export, register "
        "(options: protoserve train finetune --help)",
        add_help=False,
    )
    ft.add_argument("rest", nargs=argparse.REMAINDER)  # main() hands these over unparsed

    xp = sub.add_parser(
        "experiment",
        help="the Fashion-MNIST experiments of docs/results.md (options: NAME --help)",
    )
    xp.add_argument("name", choices=EXPERIMENTS)
    xp.add_argument("rest", nargs=argparse.REMAINDER, help="the experiment's own options")
    xp.set_defaults(func=_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["finetune"]:  # its own parser, options and --help included
        return _finetune(argv[1:])
    args = build_parser().parse_args(argv)
    args.command_line = "protoserve train " + shlex.join(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
