"""Command line: ``python -m minimrcnn {data,train,evaluate,predict,demo,ablate} ...``.

Each sub-command only parses its arguments and calls one function of the package,
so everything here can also be done from a script or a notebook.
"""

from __future__ import annotations

import argparse
import sys


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-images", help="image folder of the training set (default: shapes)")
    parser.add_argument("--train-annotations", help="COCO instances JSON of the training set")
    parser.add_argument("--val-images", help="image folder of the validation set")
    parser.add_argument("--val-annotations", help="COCO instances JSON of the validation set")
    parser.add_argument("--data", default="data/shapes", help="shapes set root, generated if absent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minimrcnn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="generate datasets")
    data_kinds = data.add_subparsers(dest="dataset", required=True)
    shapes = data_kinds.add_parser("shapes", help="the synthetic shapes set in COCO format")
    shapes.add_argument("--out", default="data/shapes")
    shapes.add_argument("--num-train", type=int, default=2000)
    shapes.add_argument("--num-val", type=int, default=200)
    shapes.add_argument("--image-size", type=int, default=128)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--classes", default=None, metavar="A,B,...",
                        help="shape classes, among square, circle, triangle, star, hexagon, pentagon, ellipse "
                             "(default: square,circle,triangle,star)")
    shapes.add_argument("--size-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="shape extent as fractions of the image side (default: 0.10 0.45)")
    shapes.add_argument("--shading", type=float, default=0.0,
                        help="0: flat colours; up to 1: lighting ramp and texture across each shape")

    train = commands.add_parser("train", help="train a model (torchrun-aware)")
    train.add_argument("--config", default=None,
                       help="preset name or JSON file (default: shapes-cpu; with --resume, the checkpoint's)")
    train.add_argument("--out", required=True, help="run folder: checkpoints, metrics, curves")
    _add_dataset_arguments(train)
    train.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                       help="fit the whole schedule into this wall-clock budget")
    train.add_argument("--max-iter", type=int, default=None, help="override the config's iterations")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    train.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    train.add_argument("--no-eval", action="store_true", help="skip COCO evaluation at the end")
    train.add_argument("--init-from-torchvision", metavar="FILE", default=None,
                       help="start from a torchvision Mask R-CNN state dict, predictors replaced "
                            "for the dataset's classes (its architecture and conventions; the rest from --config)")

    evaluate = commands.add_parser("evaluate", help="COCO-evaluate a checkpoint")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--images", required=True)
    evaluate.add_argument("--annotations", required=True)
    evaluate.add_argument("--out", default=None, help="folder for results JSON and metrics")
    evaluate.add_argument("--panoptic-annotations", default=None, metavar="FILE",
                          help="COCO panoptic JSON, for a model with a semantic head "
                               "(default: panoptic_X.json beside instances_X.json)")
    evaluate.add_argument("--panoptic-images", default=None, metavar="DIR",
                          help="its PNG folder (default: ROOT/panoptic/X for shapes, else panoptic_X/)")
    evaluate.add_argument("--device", default=None)

    predict = commands.add_parser("predict", help="draw predictions on images")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("images", nargs="+")
    predict.add_argument("--out", default="runs/predict")
    predict.add_argument("--score-thresh", type=float, default=0.5)
    predict.add_argument("--device", default=None)

    demo = commands.add_parser("demo", help="the main job: data, train, evaluate, pictures")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--data", default="data/shapes")
    demo.add_argument("--time-budget", type=float, default=None, metavar="MINUTES")
    demo.add_argument("--device", default=None)

    ablate = commands.add_parser("ablate", help="the paper's Table 2 ablations, several seeds each (resumable)")
    ablate.add_argument("--out", default="runs/ablate", help="folder: runs.json, table.md, one folder per run")
    ablate.add_argument("--seeds", type=int, default=3)
    ablate.add_argument("--only", default=None, help="comma-separated rows (default: all; see engine/ablate.py)")
    length = ablate.add_mutually_exclusive_group(required=True)
    length.add_argument("--time-budget", type=float, default=None, metavar="MINUTES", help="per run")
    length.add_argument("--iterations", type=int, default=None, help="fixed iterations per run (fair under load)")
    ablate.add_argument("--config", default="shapes-cpu", help="base preset or JSON file")
    ablate.add_argument("--data", default="data/shapes")
    ablate.add_argument("--device", default=None)
    ablate.add_argument("--threads", type=int, default=None, help="torch threads per run")
    ablate.add_argument("--nice", type=int, default=0, help="niceness of each run's process")
    ablate.add_argument("--val-limit", type=int, default=None, help="evaluate on the first N val images only")
    ablate.add_argument("--jobs", type=int, default=1, help="runs at a time, each pinned to its share of the CPUs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from minimrcnn.engine.interrupts import TrainingInterrupted

    # Ctrl-C or SIGTERM ends any command with one line, not a traceback: during training
    # after the checkpoint of that iteration is written, elsewhere (data generation,
    # evaluation, pictures) at once, since nothing there is worth saving.
    try:
        return _run(args)
    except TrainingInterrupted as stop:
        print(_interrupted_line(args, stop), file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's convention


def _interrupted_line(args, stop) -> str:
    """One line that says where training stopped and how to continue it."""
    if args.command == "demo":  # the demo has no --resume of its own; train continues its run
        return (f"interrupted at iteration {stop.iteration}; continue with "
                f"python -m minimrcnn train --out {args.out} --resume")
    return str(stop)


def _run(args) -> int:
    if args.command == "data":
        from minimrcnn.data.shapes import SIZE_RANGE, THING_NAMES, generate_shapes

        classes = tuple(name.strip() for name in args.classes.split(",")) if args.classes else THING_NAMES
        generate_shapes(args.out, num_train=args.num_train, num_val=args.num_val,
                        image_size=args.image_size, seed=args.seed, classes=classes,
                        size_range=tuple(args.size_range) if args.size_range else SIZE_RANGE,
                        shading=args.shading)
        return 0
    if args.command == "train":
        from minimrcnn.engine.train import train_from_args

        train_from_args(args)
        return 0
    if args.command == "evaluate":
        from minimrcnn.engine.evaluate import evaluate_from_args

        evaluate_from_args(args)
        return 0
    if args.command == "predict":
        from minimrcnn.engine.predict import predict_from_args

        predict_from_args(args)
        return 0
    if args.command == "ablate":
        from minimrcnn.engine.ablate import ablate_from_args

        ablate_from_args(args)
        return 0
    if args.command == "demo":
        from minimrcnn.engine.demo import run_demo

        run_demo(args)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
