"""`facecorpus train {pncc,inpaint,position}` and `facecorpus predict` (cheap to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

TASK_NAMES = ("pncc", "inpaint", "position")


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a network on a dataset (pncc, inpaint, position)",
        description="Train one task. Config: configs/train_<task>.yaml defaults, then --config "
                    "(merged over them), then flags. Under torchrun every process runs this "
                    "command and they train as one DDP job.")
    p.add_argument("task", choices=TASK_NAMES)
    p.add_argument("--data", required=True, help="dataset root (path or URL)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: from config (auto)")
    p.add_argument("--config", help="YAML merged over the task's defaults")
    p.add_argument("--out", help="output folder (default runs/<task>)")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--workers", type=int, help="DataLoader workers")
    p.add_argument("--seed", type=int)
    p.add_argument("--join", metavar="ROOT",
                   help="second dataset supplying fields --data lacks, rows matched by "
                        "subject_id == sample_id (e.g. synthesis OUT/views + OUT/faces)")
    p.add_argument("--resume", help="checkpoint to resume from, or 'auto' (OUT/checkpoints/last.pt "
                                    "if present)")
    p.set_defaults(func=_train)

    q = sub.add_parser("predict", help="run a training checkpoint; write PNG predictions")
    q.add_argument("--checkpoint", required=True)
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (inpaint: RGBA UV maps, alpha = visible)")
    src.add_argument("--data", help="dataset root")
    q.add_argument("--out", required=True)
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    q.add_argument("--split", choices=("val", "train", "all"), default="val",
                   help="--data: which of the checkpoint's split filters to use")
    q.add_argument("--limit", type=int, default=0, help="--data: at most N samples (0: all)")
    q.add_argument("--batch-size", type=int, default=16)
    q.set_defaults(func=_predict)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    import yaml
    from facecorpus.core.errors import ConfigError

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def load_train_config(task: str, config: str | None = None, overrides: dict | None = None):
    """Defaults of the task, merged with a YAML file and flag overrides, validated."""
    from importlib.resources import files

    from facecorpus.configs.train import TrainConfig
    from facecorpus.core.errors import ConfigError
    from pydantic import ValidationError

    defaults = files("facecorpus.configs").joinpath(f"train_{task}.yaml")
    data = _read_yaml(Path(str(defaults)))
    where = "defaults"
    if config:
        user = _read_yaml(Path(config))
        if user.get("task", task) != task:
            raise ConfigError(f"{config}: task {user['task']!r} does not match command task {task!r}")
        data = _deep_merge(data, user)
        where = config
    data = _deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                 for err in e.errors()]
        raise ConfigError(f"{where}: invalid train config\n" + "\n".join(lines)) from None


def _train(args: argparse.Namespace) -> int:
    import json

    from facecorpus.training.trainer import Trainer

    cfg = load_train_config(args.task, args.config, {
        "device": args.device, "steps": args.steps, "batch_size": args.batch_size,
        "num_workers": args.workers, "seed": args.seed,
        "join": {"data": args.join} if args.join else None})
    out = Path(args.out or f"runs/{args.task}")
    resume = args.resume
    if resume == "auto":
        last = out / "checkpoints" / "last.pt"
        resume = last if last.is_file() else None
    trainer = Trainer(cfg, args.data, out)
    try:
        history = trainer.fit(resume=resume)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.dist.main:
        val = [r for r in history if r["split"] == "val"]
        summary = {"out": str(out), "step": trainer.step,
                   "val_loss_first": val[0].get("loss") if val else None,
                   "val_loss_last": val[-1].get("loss") if val else None}
        print(json.dumps(summary))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from facecorpus.training.predict import Predictor, predict_dataset, predict_images

    predictor = Predictor(args.checkpoint, args.device)
    if args.images:
        rep = predict_images(predictor, args.images, args.out)
    else:
        filters = {"val": predictor.cfg.val_filter, "train": predictor.cfg.train_filter,
                   "all": []}[args.split]
        rep = predict_dataset(predictor, args.data, args.out, filters, args.batch_size, args.limit)
    print(f"wrote {len(rep.written)} prediction(s) to {args.out}; rejected {len(rep.rejected)}")
    return 0
