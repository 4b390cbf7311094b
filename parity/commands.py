"""``rtdetr-parity`` training, evaluation, inference and dataset commands, for either framework.

    rtdetr-parity make-dataset [--root DIR] [--seed 0] [--num-train N] [--num-val N]
    rtdetr-parity train --framework {torch,jittor} [--dataset DIR] [--out DIR] [--epochs N]
                        [--size 640] [--batch-size 4] [--init-weights W] ...
    rtdetr-parity eval  --framework {torch,jittor} --weights W [--dataset DIR] [--out DIR]
    rtdetr-parity infer --framework {torch,jittor} --weights W --images DIR [--out DIR]
                        [--threshold 0.5]
    rtdetr-parity init-weights OUT.safetensors [--framework torch] [--variant r18vd] [--seed 0]
    rtdetr-parity make-trained [--out PATH] [--force] [--steps N] [--size 160] [--seed 0]

Without ``--dataset`` every command uses the embedded synthetic dataset
(:data:`rtdetr_common.synthetic.DEFAULT_DATASET`), generated on first use. ``train`` resumes
from ``<out>/last.pth`` (torch) or ``<out>/last.pkl`` (Jittor) when present; SIGTERM or Ctrl-C
stops it after the current step with a checkpoint, and running the same command again continues
where it stopped. ``eval`` and ``infer`` read the variant and size stored in a training
checkpoint, so ``--variant`` / ``--size`` are only needed for other weight files.

:func:`add_commands` adds these subcommands to an ``argparse`` subparsers object (the
``rtdetr-parity`` parser, :mod:`parity.cli`).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path

import numpy as np

from rtdetr_common.coco import CategoryMap
from rtdetr_common.configs import VARIANTS
from rtdetr_common.devices import DEVICES
from rtdetr_common.run_log import format_metrics
from rtdetr_common.run_state import checkpoint_path
from rtdetr_common.train_config import TrainConfig
from rtdetr_common.weights import read_numpy_pickle
from rtdetr_common.weights import JITTOR_SUFFIXES, TORCH_SUFFIXES, atomic_write

FRAMEWORKS = ("torch", "jittor")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

# TrainConfig fields set by `train` options of the same name (dashes for underscores).
_TRAIN_OPTIONS = {
    "variant": (str, "official variant (default r18vd)"),
    "epochs": (int, "epochs (default 72)"),
    "size": (int, "train/eval input size, a multiple of 32 (default 640)"),
    "augment": (str, "training augmentation: official, or light (no zoom-out / IoU crop; "
                     "for short runs from scratch) (default official)"),
    "batch_size": (int, "images per iteration (default 4)"),
    "eval_batch_size": (int, "images per evaluation batch (default 8)"),
    "lr": (float, "base learning rate (default 1e-4)"),
    "backbone_lr": (float, "backbone rate (default: official 1e-5, meant for a pretrained "
                           "backbone; from scratch use the same value as --lr)"),
    "weight_decay": (float, "AdamW weight decay (default 1e-4)"),
    "lr_gamma": (float, "decay factor at each milestone (default 0.1)"),
    "warmup_iters": (int, "linear warm-up iterations (default 0, as official v1)"),
    "clip_max_norm": (float, "gradient norm clip (default 0.1; 0 disables)"),
    "ema_decay": (float, "EMA decay (default 0.9999)"),
    "ema_warmups": (int, "EMA warm-up updates (default 2000; short runs need fewer)"),
    "seed": (int, "seed of initialisation, data order, augmentation and noise (default 0)"),
    "num_workers": (int, "data-loading processes (default 0; batches identical for any count)"),
    "threads": (int, "torch CPU threads (default: torch's; resume bit-exactly with the same)"),
    "device": (str, "cpu or cuda (default cpu; under torchrun/mpirun one GPU per process)"),
    "init_weights": (str, "weights to start from (.pth, .pkl, .safetensors, .npz)"),
    "init_entry": (str, "entry of --init-weights loaded first: ema or model (default ema)"),
    "backbone_weights": (str, "ImageNet PResNet weights for the backbone alone (the published "
                              ".pth; Jittor: .safetensors/.npz/.pkl, see convert --backbone)"),
    "eval_every": (int, "evaluate every N epochs and after the last (default 1; 0: never)"),
    "log_every": (int, "log.jsonl line every N iterations (default 1)"),
}


def _sizes(text: str) -> list[int]:
    """``"off"`` or a comma-separated list of sizes."""
    if text.strip().lower() == "off":
        return []
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 480,512,544 or 'off', got {text!r}")


def _milestones(text: str) -> list[int]:
    """A comma-separated list of epochs."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs like 40,60, got {text!r}")


def _trainer_module(framework: str):
    """The trainer module of a framework (imported on demand)."""
    if framework == "torch":
        import torch_ref.trainer as module
    else:
        import jittor_impl.trainer as module
    return module


def read_train_state(path: str | Path) -> dict | None:
    """The ``train_state`` of a training checkpoint of either trainer, or None for other files.

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix in TORCH_SUFFIXES:
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
            raise ValueError(f"{path}: cannot be read as a weights-only PyTorch file: {exc}") from exc
    elif path.suffix in JITTOR_SUFFIXES:
        obj = read_numpy_pickle(path)
    else:
        return None
    state = obj.get("train_state") if isinstance(obj, dict) else None
    return state if isinstance(state, dict) else None


def _weights_config(args: argparse.Namespace, state: dict | None) -> TrainConfig:
    """Variant and size from the options, else from a training checkpoint, else the defaults."""
    stored = state.get("config", {}) if state else {}
    return TrainConfig(variant=args.variant or stored.get("variant", "r18vd"),
                       size=args.size or stored.get("size", 640),
                       init_weights=str(args.weights), init_entry=args.entry,
                       dataset=args.dataset, output_dir=str(args.out),
                       eval_batch_size=args.batch_size, num_workers=args.workers,
                       device=args.device)


# ---------------------------------------------------------------------------------- commands


def cmd_make_dataset(args: argparse.Namespace) -> int:
    """Generates a synthetic COCO-format dataset (the embedded default without ``--root``)."""
    from rtdetr_common.synthetic import ensure_default_dataset, make_dataset

    options = {k: v for k, v in (("seed", args.seed), ("num_train", args.num_train),
                                 ("num_val", args.num_val), ("num_classes", args.num_classes),
                                 ("min_size", args.min_size), ("max_size", args.max_size))
               if v is not None}
    if args.root is None:
        if options:
            raise ValueError(f"without --root only the embedded default dataset is generated; "
                             f"give --root DIR to use {sorted(options)}")
        dataset = ensure_default_dataset()
    elif args.root.exists() and not args.overwrite:
        raise ValueError(f"{args.root} already exists; pass --overwrite to replace it")
    else:
        dataset = make_dataset(args.root, overwrite=args.overwrite, **options)
    p = dataset.params
    print(f"dataset at {dataset.root}: {p.num_train} train / {p.num_val} val images, "
          f"{p.num_classes} classes ({', '.join(c.name for c in p.classes)}), seed {p.seed}")
    print(f"  train: {dataset.train_images}  {dataset.train_ann}")
    print(f"  val:   {dataset.val_images}  {dataset.val_ann}")
    return 0


def _quiet(*args, **kwargs) -> None:
    """Prints nothing (the console of a process other than process 0)."""


def cmd_train(args: argparse.Namespace) -> int:
    """Trains (or resumes) with one framework's trainer."""
    values = {name: getattr(args, name) for name in _TRAIN_OPTIONS
              if getattr(args, name) is not None}
    if args.multi_scale is not None:
        values["multi_scale"] = args.multi_scale
    if args.milestones is not None:
        values["lr_milestones"] = args.milestones
    out = args.out or f"runs/train-{args.framework}"
    cfg = TrainConfig(dataset=args.dataset, output_dir=str(out), use_ema=not args.no_ema, **values)
    module = _trainer_module(args.framework)
    trainer = module.Trainer(cfg)
    c = trainer.cfg
    say = print if trainer.rank == 0 else _quiet  # one process speaks for all
    say(f"rtdetr-parity train: {args.framework}, {c.variant}, {c.num_classes} classes, "
          f"size {c.size} (multi-scale {c.multi_scale or 'off'}), batch {c.batch_size}, "
          f"{c.epochs} epochs, output {c.output_dir}", flush=True)
    if trainer.backbone_loaded:
        say(trainer.backbone_loaded, flush=True)
    ckpt = checkpoint_path(c, module.CHECKPOINT_SUFFIX)
    if ckpt.is_file():
        say(f"resuming from {ckpt}", flush=True)
    result = trainer.train()
    p = result.progress
    if result.interrupted:
        say(f"stopped by {result.interrupted} at epoch {p.epoch + 1}, batch {p.iteration} "
              f"({p.global_step} iterations done); checkpoint {result.checkpoint}. "
              f"Run the same command again to resume.")
        return 128 + int(signal.Signals[result.interrupted])
    say(f"training complete: {p.global_step} iterations, checkpoint {result.checkpoint}")
    if result.metrics is not None:
        say(f"val: {format_metrics(result.metrics)}")
    return 0


def cmd_init_weights(args: argparse.Namespace) -> int:
    """Writes a trainer's initial model weights (from ``--seed``) to a neutral weight file.

    Both trainers given the file as ``--init-weights`` start from the same weights, which the
    loss and AP comparison of a torch and a Jittor run needs (each framework's own seeded
    initialisation differs).
    """
    from rtdetr_common.weights import NEUTRAL_SUFFIXES, WeightSet, save_neutral

    if args.path.suffix not in NEUTRAL_SUFFIXES:
        raise ValueError(f"{args.path}: use a neutral weight file ({', '.join(NEUTRAL_SUFFIXES)})")
    cfg = TrainConfig(variant=args.variant, size=args.size, seed=args.seed, dataset=args.dataset)
    trainer = _trainer_module(args.framework).Trainer(cfg)
    save_neutral(WeightSet(model=trainer.model_weights()), args.path)
    print(f"wrote {args.path}: {args.framework} initialisation of {trainer.cfg.variant} "
          f"({trainer.cfg.num_classes} classes of {trainer.cfg.dataset or 'the default dataset'}), "
          f"seed {args.seed}")
    return 0


def cmd_make_trained(args: argparse.Namespace) -> int:
    """Trains (or reuses) the small r18vd checkpoint of :mod:`parity.trained`; prints its path."""
    from .trained import trained_checkpoint

    path = trained_checkpoint(args.out, steps=args.steps, size=args.size, seed=args.seed,
                              force=args.force, dataset=args.dataset)
    print(path)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """COCO AP of a weights file on the val split; writes the COCO results JSON."""
    cfg = _weights_config(args, read_train_state(args.weights))
    trainer = _trainer_module(args.framework).Trainer(cfg)
    metrics = trainer.evaluate("val")
    results = Path(trainer.cfg.output_dir) / "results_val.json"
    print(f"rtdetr-parity eval: {args.framework}, {trainer.cfg.variant} at {trainer.cfg.size}, "
          f"weights {args.weights}, val split {trainer.cfg.val_ann}")
    print(metrics.summary.rstrip())
    print(format_metrics(metrics))
    print(f"detections: {results}")
    return 0


def _inference_categories(args: argparse.Namespace, state: dict | None) -> CategoryMap:
    """Category ids and names for inference: checkpoint, then ``--dataset``, then COCO 2017."""
    if state and state.get("categories"):
        return CategoryMap({int(c["id"]): str(c["name"]) for c in state["categories"]})
    if args.dataset is not None:
        from rtdetr_common.coco_eval import load_coco
        from rtdetr_common.train_config import split_paths

        _, ann = split_paths(TrainConfig(dataset=args.dataset), "train")
        return CategoryMap.from_coco(load_coco(ann))
    from .convert import infer_num_classes, read_any

    num_classes = infer_num_classes(read_any(args.weights))
    if num_classes == 80:
        return CategoryMap.coco2017()
    raise ValueError(f"{args.weights} predicts {num_classes} classes and holds no category list: "
                     f"pass --dataset with the dataset it was trained on")


def _read_images(folder: Path) -> list[tuple[Path, np.ndarray]]:
    """Every readable image of a folder as uint8 RGB, sorted by name (unreadable ones skipped)."""
    from PIL import Image

    from rtdetr_common.pipeline.coco_dataset import pil_to_rgb8

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as pil:
                pil.load()
                images.append((path, pil_to_rgb8(pil)))
        except (OSError, SyntaxError, ValueError) as exc:
            logging.getLogger(__name__).warning("skipping unreadable image %s: %s", path, exc)
    if not images:
        raise ValueError(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images


def cmd_infer(args: argparse.Namespace) -> int:
    """Detections on a folder of images: a COCO results JSON and annotated PNGs."""
    from rtdetr_common.coco_eval import detections_to_coco, write_results_json
    from rtdetr_common.draw import draw_detections, save_png

    state = read_train_state(args.weights)
    categories = _inference_categories(args, state)
    images = _read_images(Path(args.images))
    cfg = _weights_config(args, state)
    trainer = _trainer_module(args.framework).Trainer(cfg, category_map=categories)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = []
    for (path, image), result in zip(images, trainer.predict([im for _, im in images])):
        keep = result["scores"] >= args.threshold
        kept.append({k: v[keep] for k, v in result.items()})
        drawn = draw_detections(image, result["boxes"], result["labels"], result["scores"],
                                names=categories.names, score_threshold=args.threshold)
        save_png(out / f"{path.stem}.png", drawn)
    detections = detections_to_coco(list(range(1, len(images) + 1)), kept, categories)
    for entry in detections:
        entry["file_name"] = images[entry["image_id"] - 1][0].name
    write_results_json(out / "detections.json", detections)
    index = [{"id": i + 1, "file_name": p.name, "width": int(im.shape[1]),
              "height": int(im.shape[0])} for i, (p, im) in enumerate(images)]
    cats = [{"id": c, "name": n} for c, n in zip(categories.category_ids, categories.names)]
    text = json.dumps({"images": index, "categories": cats}, indent=1)
    atomic_write(out / "images.json", lambda tmp: tmp.write_text(text))
    print(f"rtdetr-parity infer: {args.framework}, {trainer.cfg.variant} at {trainer.cfg.size}, "
          f"{len(images)} images, {len(detections)} detections with score >= {args.threshold}")
    print(f"wrote {out / 'detections.json'}, {out / 'images.json'} and {len(images)} PNGs in {out}")
    return 0


# ---------------------------------------------------------------------------------- parser


def _add_weights_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    parser.add_argument("--weights", required=True, type=Path,
                        help="training checkpoint (last.pth / last.pkl), official .pth, or "
                             ".safetensors / .npz (Jittor: no .pth; convert it first)")
    parser.add_argument("--entry", default="ema", choices=("ema", "model"),
                        help="state_dict of --weights to use when it holds both (default ema)")
    parser.add_argument("--variant", default=None, choices=list(VARIANTS),
                        help="variant (default: from a training checkpoint, else r18vd)")
    parser.add_argument("--size", type=int, default=None,
                        help="input size (default: from a training checkpoint, else 640)")
    parser.add_argument("--dataset", default=None,
                        help="dataset root (default: the embedded synthetic dataset)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output folder")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes")
    parser.add_argument("--device", default="cpu", choices=DEVICES, help="cpu or cuda (default cpu)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``make-dataset``, ``train``, ``eval``, ``init-weights``, ``make-trained`` and
    ``infer`` to an ``add_subparsers()`` object.

    Each subcommand sets ``func`` to its handler, which takes the parsed arguments and returns
    the exit status.
    """
    make = subparsers.add_parser("make-dataset", help="generate a synthetic COCO-format dataset")
    make.add_argument("--root", type=Path, default=None,
                      help="dataset folder to create (default: the embedded default's cache)")
    make.add_argument("--seed", type=int, default=None)
    make.add_argument("--num-train", type=int, default=None)
    make.add_argument("--num-val", type=int, default=None)
    make.add_argument("--num-classes", type=int, default=None)
    make.add_argument("--min-size", type=int, default=None, help="smallest image side (--root only)")
    make.add_argument("--max-size", type=int, default=None, help="largest image side (--root only)")
    make.add_argument("--overwrite", action="store_true", help="replace an existing --root")
    make.set_defaults(func=cmd_make_dataset)

    train = subparsers.add_parser("train", help="train (or resume) RT-DETR with one framework")
    train.add_argument("--framework", required=True, choices=FRAMEWORKS)
    train.add_argument("--dataset", default=None,
                       help="dataset root (default: the embedded synthetic dataset)")
    train.add_argument("--out", default=None,
                       help="output folder: log.jsonl, last.pth/.pkl (default runs/train-<framework>)")
    for name, (kind, text) in _TRAIN_OPTIONS.items():
        train.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                           help=text)
    train.add_argument("--multi-scale", type=_sizes, default=None,
                       help="training sizes, e.g. 480,512,...,800, or 'off' (default: official "
                            "list scaled to --size)")
    train.add_argument("--milestones", type=_milestones, default=None,
                       help="epochs where the rate decays (default 1000: never, as official)")
    train.add_argument("--no-ema", action="store_true", help="train without an EMA")
    train.set_defaults(func=cmd_train)

    ev = subparsers.add_parser("eval", help="COCO AP of weights on a dataset's val split")
    _add_weights_options(ev, "runs/eval")
    ev.set_defaults(func=cmd_eval)

    init = subparsers.add_parser("init-weights", help="a trainer's initial weights as a neutral file, "
                                                        "to start both frameworks from them")
    init.add_argument("path", type=Path, help="output .safetensors or .npz")
    init.add_argument("--framework", default="torch", choices=FRAMEWORKS,
                      help="whose initialisation (default torch: the official one)")
    init.add_argument("--variant", default="r18vd", choices=list(VARIANTS))
    init.add_argument("--size", type=int, default=640, help="input size (as the training's)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dataset", default=None,
                      help="dataset root, for the class count (default: the embedded dataset)")
    init.set_defaults(func=cmd_init_weights)

    from .trained import DEFAULT_SIZE, DEFAULT_STEPS

    trained = subparsers.add_parser(
        "make-trained", help="train (or reuse) a small r18vd checkpoint on the synthetic dataset "
                             "for parity checks on trained weights; prints its path")
    trained.add_argument("--out", type=Path, default=None,
                         help="weight file (.safetensors; default runs/trained/"
                              "r18vd-synthetic-<recipe hash>.safetensors)")
    trained.add_argument("--force", action="store_true", help="train again even if the file exists")
    trained.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                         help=f"training iterations (default {DEFAULT_STEPS})")
    trained.add_argument("--size", type=int, default=DEFAULT_SIZE,
                         help=f"training size (default {DEFAULT_SIZE})")
    trained.add_argument("--seed", type=int, default=0)
    trained.add_argument("--dataset", default=None,
                         help="dataset root (default: the embedded synthetic dataset)")
    trained.set_defaults(func=cmd_make_trained)

    infer = subparsers.add_parser("infer", help="detect objects in a folder of images")
    _add_weights_options(infer, "runs/infer")
    infer.add_argument("--images", required=True, help="folder of images")
    infer.add_argument("--threshold", type=float, default=0.5,
                       help="minimum score of the detections written and drawn")
    infer.set_defaults(func=cmd_infer)
