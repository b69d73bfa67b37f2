"""The training loop: SGD with warm-up and decay, AMP, accumulation, DDP, exact resume, time budgets.

One iteration processes ``config.batch_size`` images in all (split over the processes,
then over ``grad_accum_steps`` micro-batches), takes one optimizer step and sets the
learning rate from :func:`~minimrcnn.engine.schedule.lr_factor`. Every random choice is a
pure function of ``(seed, iteration)``: the sampler orders the images by it, each sample's
augmentation is seeded by its stream position, and the model's own sampling (anchors,
RoIs) runs after ``torch.manual_seed(mix_seed(seed, iteration, micro_batch))``. Hence a
run resumed from a checkpoint ends with the same weights as one never interrupted, and G
processes compute what one process computes with G accumulation steps.

Nothing in the loop waits for the device except every ``LOG_PERIOD`` iterations, when the
losses are read back, checked for NaN/inf and written as a JSON line, and when a checkpoint
is written or a time budget's planner times a few iterations.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from minimrcnn.config import Config, get_config
from minimrcnn.engine import checkpoint as ckpt
from minimrcnn.engine import distributed as distrib
from minimrcnn.engine.device import resolve_device
from minimrcnn.engine.evaluate import evaluate_model
from minimrcnn.engine.interrupts import StopRequests, TrainingInterrupted
from minimrcnn.engine.logging import LOSS_NAMES, MetricsWriter, plot_loss_curve, read_metrics
from minimrcnn.engine.progress import Progress
from minimrcnn.engine.schedule import (CALIBRATION_ITERS, CALIBRATION_SKIP, BudgetPlanner, lr_factor,
                                       stretch_warmup)

LOG_PERIOD = 20  # iterations between loss read-backs (each one waits for the device)
MIN_PROVISIONAL_ITERS = CALIBRATION_SKIP + CALIBRATION_ITERS + 1
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- building blocks


def shapes_root(data_root) -> Path:
    """``data_root`` holding a current shapes set: one already there keeps its size (a small
    test set stays small), an absent or outdated one is generated (2000 train / 200 val)."""
    from minimrcnn.data.shapes import SPLITS, ensure_shapes, recorded_settings

    root = Path(data_root)
    sizes = {}
    for split in SPLITS:
        try:
            recorded = recorded_settings(root, split)  # None when absent or unreadable
            sizes[f"num_{split}"] = recorded["num_images"]
            sizes.update(image_size=recorded["image_size"], seed=recorded["seed"])
        except (KeyError, TypeError):  # absent, unreadable or incomplete: generate afresh
            sizes = {}
            break
    return Path(ensure_shapes(root, **sizes))


def dataset_paths(train_images=None, train_annotations=None, val_images=None, val_annotations=None,
                  data_root="data/shapes") -> dict:
    """The four dataset paths; the shapes set under ``data_root`` (generated if absent) by default."""
    given = {"train_images": train_images, "train_annotations": train_annotations,
             "val_images": val_images, "val_annotations": val_annotations}
    if train_images is None and train_annotations is None:
        root = shapes_root(data_root)
        shapes = {"train_images": root / "images", "train_annotations": root / "annotations/instances_train.json",
                  "val_images": root / "images", "val_annotations": root / "annotations/instances_val.json"}
        if val_images is None and val_annotations is None:
            return shapes
        given.update({k: shapes[k] for k in ("train_images", "train_annotations")})
    if (given["train_images"] is None) != (given["train_annotations"] is None):
        raise ValueError("train_images and train_annotations: give both or neither")
    if (given["val_images"] is None) != (given["val_annotations"] is None):
        raise ValueError("val_images and val_annotations: give both or neither")
    for key, value in given.items():
        if value is not None and not Path(value).exists():
            raise ValueError(f"{key}: {value} does not exist")
    return {key: Path(value) if value is not None else None for key, value in given.items()}


class SeededSamples(torch.utils.data.Dataset):
    """Indexed by ``(index, seed)``: the sample with its random augmentation drawn from ``seed``."""

    def __init__(self, dataset, transform=None):
        self.dataset = dataset
        self.transform = transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        image, target = self.dataset[index]
        if self.transform is None:
            return image, target
        with torch.random.fork_rng(devices=[]):  # the transforms draw from torch's CPU generator
            torch.default_generator.manual_seed(seed)
            return self.transform(image, target)


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and, on a GPU, that GPU's (``torch.manual_seed`` also visits every
    other backend and costs a hundred times more)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.SGD:
    """SGD with momentum; no weight decay on biases and normalization weights (1-D parameters)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=config.base_lr,
                           momentum=config.momentum)


def build_train_loader(dataset, config: Config, sampler, device: torch.device):
    from minimrcnn.data.prepare import collate_for_training
    from minimrcnn.data.transforms import ColorJitter, Compose, RandomHorizontalFlip

    transform = RandomHorizontalFlip(config.hflip_prob) if config.hflip_prob > 0 else None
    if config.color_jitter > 0:  # after the flip, so that runs without jitter draw as before
        transform = Compose([t for t in (transform, ColorJitter(config.color_jitter)) if t is not None])
    return torch.utils.data.DataLoader(
        # targets checked and freed of crowds and empty boxes here, on the CPU (in the workers)
        SeededSamples(dataset, transform), batch_sampler=sampler,
        collate_fn=functools.partial(collate_for_training, num_classes=config.num_classes),
        num_workers=config.num_workers, persistent_workers=config.num_workers > 0,
        pin_memory=device.type == "cuda")


def autocast_for(config: Config, device: torch.device):
    """The autocast context of ``config.amp`` (mixed precision on CUDA only)."""
    if config.amp not in ("none", *AMP_DTYPES):
        raise ValueError(f"config.amp: expected 'none', 'bf16' or 'fp16', got {config.amp!r}")
    if config.amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=AMP_DTYPES[config.amp])


def _to_device(images, targets, device):
    if device.type == "cpu":
        return images, targets
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _raise_if_nonfinite(loss_rows: torch.Tensor, first_iteration: int, names) -> None:
    """loss_rows: [T, L], one row per iteration from ``first_iteration`` on."""
    finite = torch.isfinite(loss_rows)
    if bool(finite.all()):
        return
    row, column = (~finite).nonzero()[0].tolist()
    raise FloatingPointError(
        f"{names[column]} is {loss_rows[row, column].item()} at iteration {first_iteration + row}: "
        "training stopped; no checkpoint was written after the last good one "
        "(lower config.base_lr, raise warm-up, or set config.grad_clip)")


def _check_resume_config(config: Config, saved: dict, path: Path) -> None:
    current = ckpt.config_to_dict(config)
    differing = sorted(key for key in current if current[key] != saved.get(key))
    if differing:
        raise ValueError(f"{path}: the checkpoint was trained with another config; "
                         f"differing fields: {differing}")


def _class_info(dataset) -> dict:
    names = getattr(dataset, "class_names", None)
    category_ids = getattr(dataset, "category_ids", None)
    info = {"class_names": list(names) if names is not None else None,
            "category_ids": [int(c) for c in category_ids] if category_ids is not None else None}
    if getattr(dataset, "stuff_names", None) is not None:  # CocoPanoptic: names of the semantic classes
        info["stuff_names"] = list(dataset.stuff_names)
    return info


def _classes_from_data(config: Config, train_dataset, val_dataset, paths: dict, fixed_by: str | None,
                       announce: bool) -> Config:
    """The config with the training set's ``num_classes``; val must list the same categories."""
    from minimrcnn.engine.classes import categories_of, check_same_categories, config_for_dataset

    if val_dataset is not None:
        check_same_categories(categories_of(train_dataset), categories_of(val_dataset),
                              f"train annotations {paths['train_annotations']}",
                              f"val annotations {paths['val_annotations']}")
    return config_for_dataset(config, train_dataset, fixed=fixed_by is not None, source=str(fixed_by),
                              announce=print if announce else (lambda line: None))


def _stop_requested(stops: StopRequests, info, iteration: int, log_period: int) -> bool:
    """Whether to stop after ``iteration``. Alone: as soon as a signal came. Under DDP every
    process must stop at the same iteration, so they agree every ``log_period`` iterations,
    where the loop waits for the device anyway."""
    if not info.is_distributed:
        return stops.requested
    if iteration % log_period:
        return False
    return distrib.all_reduce_max(float(stops.requested))[0] > 0


# ---------------------------------------------------------------- the loop


def train_step(model, batches, optimizer, scaler, autocast, trainable, config: Config, iteration: int,
               rank: int, device) -> tuple[torch.Tensor, list[str]]:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns the losses [L] and names.

    The losses stay on the device (no sync); they are read back every ``log_period`` iterations.
    """
    optimizer.zero_grad(set_to_none=True)
    summed = None
    for micro_step in range(config.grad_accum_steps):
        images, targets = _to_device(*next(batches), device)
        # The model's random choices (anchor and RoI sampling) depend only on the position in training.
        seed_generators(distrib.mix_seed(config.seed, iteration, rank * config.grad_accum_steps + micro_step),
                        device)
        last_micro = micro_step == config.grad_accum_steps - 1
        # Under DDP, gradients are all-reduced only after the last micro-batch.
        sync = model.no_sync() if hasattr(model, "no_sync") and not last_micro else contextlib.nullcontext()
        with sync:
            with autocast:
                try:
                    losses = model(images, targets)
                except FloatingPointError as exc:  # the model's own check: add where it happened
                    raise FloatingPointError(f"iteration {iteration}: {exc}") from exc
            names = [n for n in LOSS_NAMES if n in losses] + sorted(n for n in losses if n not in LOSS_NAMES)
            total = sum(losses[n] for n in names) / config.grad_accum_steps
            (scaler.scale(total) if scaler is not None else total).backward()
        stacked = torch.stack([losses[n].detach().float() for n in names])  # [L]
        summed = stacked if summed is None else summed + stacked
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return summed / config.grad_accum_steps, names


def train(config: Config | None, out_dir, train_images=None, train_annotations=None, val_images=None,
          val_annotations=None, data_root="data/shapes", time_budget_minutes: float | None = None,
          resume: bool = False, device=None, max_iter: int | None = None, evaluate: bool = True,
          progress: bool = True, log_period: int = LOG_PERIOD,
          num_classes_fixed_by: str | None = None, init_from_torchvision=None) -> dict:
    """Train a Mask R-CNN; returns the run summary (also written to ``out_dir/metrics.json``).

    ``config`` may be None with ``resume``: the checkpoint's config is used. Under a
    ``time_budget_minutes`` the whole call, final evaluation included, ends within the
    budget: the speed of the first iterations sets ``max_iter`` and the schedule
    stretches to it. Writes ``last.pth`` (every ``checkpoint_period`` iterations and at the
    end), ``model_final.pth``, ``metrics.jsonl`` (a line every ``log_period`` iterations),
    ``loss_curve.png`` and ``metrics.json``; with ``config.semantic_head`` also the panoptic
    predictions of val (``panoptic_predictions.json`` and PNGs) and their PQ in the summary.

    ``num_classes`` comes from the training set's categories: a config that differs adapts
    (one printed line), unless ``num_classes_fixed_by`` names the user's config file that sets
    the field, which makes a mismatch an error naming that file. Train and val must list the same categories.

    ``init_from_torchvision``: a torchvision Mask R-CNN state dict file to start from, its predictors replaced for the dataset's classes
    (see ``minimrcnn.interop.finetune_model``; ignored when resuming).
    """
    call_start = time.perf_counter()
    device = resolve_device(device)
    info = distrib.init_distributed(device)
    if device.type == "cuda" and info.is_distributed:
        device = torch.device("cuda", info.local_rank)
    out_dir = Path(out_dir)
    last_path = out_dir / "last.pth"

    saved = None
    if resume:
        saved = ckpt.load_checkpoint(last_path)
        if config is None:
            config = ckpt.config_from_dict(saved["config"], source=str(last_path))
        if "optimizer" not in saved:
            raise ValueError(f"{last_path}: holds no optimizer state, cannot resume from it")
    if not isinstance(config, Config):
        raise TypeError(f"config: expected a minimrcnn Config, got {type(config).__name__}")
    if config.batch_size % (info.world_size * config.grad_accum_steps):
        raise ValueError(f"config.batch_size={config.batch_size} must divide evenly over "
                         f"{info.world_size} processes x {config.grad_accum_steps} accumulation steps")

    if info.is_main:
        paths = dataset_paths(train_images, train_annotations, val_images, val_annotations, data_root)
    distrib.barrier()  # the shapes set exists once rank 0 is past this point
    if not info.is_main:
        paths = dataset_paths(train_images, train_annotations, val_images, val_annotations, data_root)
    from minimrcnn.data import CocoInstances

    train_dataset = CocoInstances(paths["train_images"], paths["train_annotations"])
    val_dataset = CocoInstances(paths["val_images"], paths["val_annotations"]) \
        if evaluate and paths["val_images"] is not None else None
    if config.semantic_head:  # Panoptic FPN: semantic targets from the panoptic ground truth
        from minimrcnn.engine.panoptic_eval import default_panoptic_paths, panoptic_dataset

        train_dataset = panoptic_dataset(paths["train_images"], paths["train_annotations"],
                                         *default_panoptic_paths(paths["train_annotations"]), config)
        if val_dataset is not None:
            val_dataset = panoptic_dataset(paths["val_images"], paths["val_annotations"],
                                           *default_panoptic_paths(paths["val_annotations"]), config)
    for dataset in (train_dataset, val_dataset):  # a missing file fails now, not hours into the run
        if dataset is not None:
            dataset.check_image_files()
    config = _classes_from_data(config, train_dataset, val_dataset, paths, num_classes_fixed_by, info.is_main)
    if saved is not None:
        _check_resume_config(config, saved["config"], last_path)

    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matrix products, as is usual for training
        # cudnn.benchmark times every conv algorithm for each new input shape and keeps the fastest:
        # a gain only if the shapes repeat. The backbone, FPN and RPN see one shape when every image
        # has one size; the mask head sees a new RoI count each step unless mask_roi_bucket pads it
        # to a few sizes (the box head is fully connected). So: both, or no benchmark (with many
        # shapes it would re-time the mask head's convs on most steps, forward and backward).
        fixed_images = len(config.min_size) == 1 and config.min_size[0] == config.max_size
        torch.backends.cudnn.benchmark = fixed_images and config.mask_roi_bucket > 0
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    model = ckpt.build_model(config).to(device)
    if init_from_torchvision is not None and saved is None:
        # torchvision's weights with new predictors for this dataset's classes (interop.py).
        from minimrcnn.interop import finetune_model

        config, model = finetune_model(init_from_torchvision, config, train_dataset.num_classes)
        model = model.to(device)
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" and device.type == "cuda" else None

    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start_iter, max_iter = saved["iteration"], saved["max_iter"]
        warmup_iters = saved["scheduler"]["warmup_iters"]
        train_seconds_before = saved["extra"].get("train_seconds", 0.0)
        if scaler is not None and "grad_scaler" in saved["extra"]:
            scaler.load_state_dict(saved["extra"]["grad_scaler"])
        ckpt.restore_rng_states(saved["rng"])
        budget_seconds = None  # the budget was spent choosing max_iter; keep that choice
    else:
        start_iter, train_seconds_before = 0, 0.0
        max_iter = max_iter if max_iter is not None else config.max_iter
        warmup_iters = stretch_warmup(config.warmup_iters, config.max_iter, max_iter)
        budget_seconds = time_budget_minutes * 60.0 if time_budget_minutes is not None else None
        if budget_seconds is not None:  # a provisional length that outlasts the speed measurement
            max_iter = max(max_iter, MIN_PROVISIONAL_ITERS)
    if max_iter <= 0:
        raise ValueError(f"max_iter: expected a positive number of iterations, got {max_iter}")
    class_info = _class_info(train_dataset)

    ddp_model = distrib.wrap_model(model, device)
    model.train()
    sampler = distrib.InfiniteBatchSampler(
        len(train_dataset), config.batch_size, config.seed, info.rank, info.world_size,
        config.grad_accum_steps, start_iteration=start_iter)
    batches = iter(build_train_loader(train_dataset, config, sampler, device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = autocast_for(config, device)

    def save(path, iteration, with_optimizer=True):
        extra = {"warmup_iters": warmup_iters, "train_seconds": train_seconds_before + loop_seconds(),
                 **class_info}
        if scaler is not None:
            extra["grad_scaler"] = scaler.state_dict()
        ckpt.save_checkpoint(path, model, optimizer if with_optimizer else None,
                             {"max_iter": max_iter, "warmup_iters": warmup_iters}, iteration,
                             extra=extra, config=config)

    writer = MetricsWriter(out_dir / "metrics.jsonl", resume_from_iteration=start_iter if saved else None) \
        if info.is_main else None
    bar = Progress(max_iter, initial=start_iter, desc="train", enabled=progress and info.is_main)
    window: list[torch.Tensor] = []
    window_start = start_iter
    planner = BudgetPlanner(budget_seconds, call_start, device, model, val_dataset) \
        if budget_seconds is not None else None
    loop_start = time.perf_counter()

    def loop_seconds():
        return time.perf_counter() - loop_start

    iteration = start_iter
    stops = StopRequests().__enter__()  # Ctrl-C / SIGTERM: checkpoint at the iteration, then stop
    try:
        while iteration < max_iter:
            lr = config.base_lr * lr_factor(iteration, max_iter, warmup_iters, config.warmup_factor,
                                            config.lr_schedule, config.lr_steps, config.lr_gamma)
            for group in optimizer.param_groups:
                group["lr"] = lr
            iteration_losses, loss_names = train_step(ddp_model, batches, optimizer, scaler, autocast,
                                                      trainable, config, iteration, info.rank, device)
            window.append(iteration_losses)
            if device.type == "cpu":  # free on CPU: stop at the very iteration that failed
                _raise_if_nonfinite(iteration_losses[None], iteration, loss_names)
            iteration += 1
            bar.update(1)

            plan = planner.after_iteration(iteration - start_iter, iteration) if planner else None
            if plan is not None:
                max_iter, is_first_plan = plan
                if is_first_plan:  # the warm-up keeps its fraction; later plans leave it be
                    warmup_iters = stretch_warmup(config.warmup_iters, config.max_iter, max_iter)
                bar.set_total(max_iter)
            at_end = iteration >= max_iter
            if iteration % log_period == 0 or at_end:
                rows = torch.stack(window)
                _raise_if_nonfinite(rows, window_start, loss_names)
                means = rows.mean(dim=0).tolist()
                record = {"iteration": iteration, "lr": lr,
                          "time": round(train_seconds_before + loop_seconds(), 3),
                          "loss": sum(means), **dict(zip(loss_names, means))}
                if writer is not None:
                    writer.write(record)
                bar.set_losses(dict(zip(loss_names, means)))
                window, window_start = [], iteration
            if info.is_main and (iteration % config.checkpoint_period == 0 or at_end):
                if window:  # never checkpoint weights that a NaN loss may already have touched
                    _raise_if_nonfinite(torch.stack(window), window_start, loss_names)
                save(last_path, iteration)
            if not at_end and _stop_requested(stops, info, iteration, log_period):
                if info.is_main:
                    if window:
                        _raise_if_nonfinite(torch.stack(window), window_start, loss_names)
                    save(last_path, iteration)
                distrib.barrier()
                raise TrainingInterrupted(iteration, stops.signal_number or signal.SIGTERM)
    finally:
        stops.__exit__(None, None, None)
        bar.close()
        batches = None  # shuts down loader workers, which would otherwise prefetch forever
        if writer is not None:
            writer.close()

    train_seconds = train_seconds_before + loop_seconds()
    summary = {"config": config.name, "device": str(device), "world_size": info.world_size,
               "iterations": max_iter, "train_seconds": round(train_seconds, 2)}
    if info.is_main:
        save(out_dir / "model_final.pth", iteration, with_optimizer=False)
        plot_loss_curve(read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss_curve.png",
                        title=f"{config.name}: training losses")
    if val_dataset is not None:
        summary.update(evaluate_model(model, val_dataset, paths["val_annotations"], device,
                                      batch_size=max(1, config.batch_size // info.world_size),
                                      report_dir=out_dir,
                                      panoptic_out=out_dir if config.semantic_head else None))
    if info.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    distrib.barrier()
    return summary


# ---------------------------------------------------------------- command line


def train_from_args(args) -> dict:
    """``python -m minimrcnn train ...`` (see ``minimrcnn/cli.py``)."""
    num_classes_fixed_by = None
    if args.config is not None:
        config = get_config(args.config)
        num_classes_fixed_by = args.config if _json_sets_num_classes(args.config) else None
    else:  # a resumed run continues with its checkpoint's config
        config = None if args.resume else get_config("shapes-cpu")
    try:
        return train(config, args.out, train_images=args.train_images,
                     train_annotations=args.train_annotations, val_images=args.val_images,
                     val_annotations=args.val_annotations, data_root=args.data,
                     time_budget_minutes=args.time_budget, resume=args.resume, device=args.device,
                     max_iter=args.max_iter, evaluate=not args.no_eval,
                     num_classes_fixed_by=num_classes_fixed_by,
                     init_from_torchvision=getattr(args, "init_from_torchvision", None))
    finally:
        distrib.cleanup_distributed()


def _json_sets_num_classes(name_or_path: str) -> bool:
    """Whether ``--config`` is a JSON file that sets ``num_classes`` itself (presets adapt)."""
    path = Path(name_or_path)
    if not path.is_file():
        return False
    values = json.loads(path.read_text())
    return isinstance(values, dict) and "num_classes" in values
