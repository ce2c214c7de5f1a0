"""``python -m agm data | list | train | sample | evaluate`` — the same verbs for every model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from agm import checkpoint, registry
from agm.classifier import ClassifierConfig
from agm.data import DataError, provision
from agm.runtime import budget, device, repo_path, seed_everything, set_threads
from agm.train import NonFiniteLossError

SMOKE_CHECKPOINTS = repo_path("_build", "smoke-checkpoints")
MAX_SAMPLES = 100_000
LIST_METRICS = ("test_accuracy", "test_nll_nats", "bits_per_dim", "fid", "inception_score", "precision", "recall",
                "class_coverage", "target_fraction", "kl_to_reference", "digit_fid", "digit_recall")


class UsageError(Exception):
    """Bad arguments: reported in one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agm", description="Models of Advanced Generative Modeling.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("data", help="provision MNIST into data/MNIST/raw")
    sub.add_parser("list", help="models, their checkpoints and metrics")
    t = sub.add_parser("train", help="train a model and write its checkpoint and manifest")
    t.add_argument("name")
    t.add_argument("--smoke", action="store_true", help="tiny budget; writes to _build/smoke-checkpoints")
    t.add_argument("--out-dir", type=Path, help="write the checkpoint here instead")
    t.add_argument("--seed", type=int, default=0)
    _add_sample_arguments(sub.add_parser("sample", help="draw samples from a trained model"))
    e = sub.add_parser("evaluate", help="the metrics the book reports for a model")
    e.add_argument("name")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--n", type=int, help="samples for the sample-quality metrics (default 10000; smoke 500)")
    e.add_argument("--seed", type=int, default=0)
    how = e.add_mutually_exclusive_group()
    how.add_argument("--full", action="store_true",
                     help="the model's expensive evaluation (e.g. the full-test-set NLL), stored in its manifest")
    how.add_argument("--store", action="store_true",
                     help="write the metrics into the manifest, as `train` does, without retraining (after a change "
                          "of how they are measured, e.g. the sampler); the weights are not touched")
    return p


def _add_sample_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("name")
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, required=True, help="output .pt: {'images': [N,1,28,28] in [0,1], 'labels'}")
    s.add_argument("--png", type=Path, help="also write a grid of the samples as PNG")
    s.add_argument("--label", type=int, help="class to draw (conditional models only)")


def cmd_data(args) -> int:
    provision()
    return 0


def cmd_list(args) -> int:
    print(f"{'model':<22} {'ch':>3}  {'checkpoint':<10} {'requires':<16} metrics")
    for name, spec in registry.all_specs().items():
        state = checkpoint.status(name)
        metrics = ""
        if state == "verified":
            manifest = checkpoint.read_manifest(name)
            if checkpoint.stale_requirements(manifest.requires):
                state = "stale"
            m = manifest.metrics
            shown = [k for k in LIST_METRICS if k in m]
            metrics = ", ".join(f"{k}={m[k]:.4g}" for k in shown)
        requires = ",".join(spec.requires) or "-"
        print(f"{name:<22} {spec.chapter:>3}  {state:<10} {requires:<16} {metrics}")
    return 0


def cmd_train(args) -> int:
    spec = registry.get(args.name)
    previous = os.environ.get("AGM_SMOKE")
    if args.smoke:
        os.environ["AGM_SMOKE"] = "1"
    try:
        return _train(spec, args)
    finally:
        if previous is None:
            os.environ.pop("AGM_SMOKE", None)
        else:
            os.environ["AGM_SMOKE"] = previous


def _train(spec: registry.ModelSpec, args) -> int:
    out_dir = args.out_dir or (SMOKE_CHECKPOINTS if args.smoke else None)
    set_threads()
    seed_everything(args.seed)
    for path in (out_dir,):
        if path is not None and not _writable_folder(path):
            raise UsageError(f"cannot write checkpoints to {path}: it is not a folder that can be created and written")
    parents, pins = registry.load_parents(spec, out_dir)
    print(f"training {spec.name} (chapter {spec.chapter}){' [smoke]' if args.smoke else ''} ...")
    start = time.perf_counter()
    result = spec.train(args.seed, parents)
    wall = time.perf_counter() - start
    metrics = all_metrics(spec, result.model.eval(), seed=args.seed)
    command = f"python -m agm train {spec.name}" + (" --smoke" if args.smoke else "")
    if args.seed:
        command += f" --seed {args.seed}"
    manifest = checkpoint.new_manifest(spec.name, result.config, result.steps, wall, metrics, command, result.extra,
                                       requires=pins)
    checkpoint.save(spec.name, registry.state_of(result.model, result.config), manifest, out_dir)
    pt, _ = checkpoint.paths(spec.name, out_dir)
    print(f"wrote {pt} after {result.steps} steps in {wall:.1f} s: {json.dumps(metrics)}")
    return 0


def _writable_folder(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return path.is_dir() and os.access(path, os.W_OK)


def cmd_sample(args, spec: registry.ModelSpec, options: dict) -> int:
    if not spec.generative:
        raise UsageError(f"{spec.name} does not generate images; it has nothing to sample")
    if not 1 <= args.n <= MAX_SAMPLES:
        raise UsageError(f"--n must be between 1 and {MAX_SAMPLES}, got {args.n}")
    labels = None
    if args.label is not None:
        if not spec.conditional:
            raise UsageError(f"{spec.name} is not class-conditional; drop --label")
        if not 0 <= args.label < spec.num_classes:
            raise UsageError(f"--label must be in 0..{spec.num_classes - 1}, got {args.label}")
        labels = torch.full((args.n,), args.label, dtype=torch.long)
    elif spec.conditional:
        labels = torch.arange(args.n) % spec.num_classes
    for path in (args.out, args.png):
        if path is not None and not path.parent.exists():
            raise UsageError(f"folder {path.parent} does not exist")
    model = registry.load_model(spec.name)[0].to(device())  # cuda -> mps -> cpu
    generator = seed_everything(args.seed)
    try:
        with torch.no_grad():
            images = spec.sample(model, args.n, generator, labels, **options).clamp(0, 1).float().cpu()
    except ValueError as e:  # a sampler option out of range, e.g. --steps 0
        raise UsageError(str(e)) from e
    out = {"images": images}
    if labels is not None:
        out["labels"] = labels
    torch.save(out, args.out)
    print(f"wrote {args.n} samples of {spec.name} to {args.out}")
    if args.png:
        from agm.viz import save_grid

        save_grid(images, args.png)
        print(f"wrote grid to {args.png}")
    return 0


def all_metrics(spec: registry.ModelSpec, model, n: int | None = None, seed: int = 0) -> dict:
    """The model's own metrics (e.g. NLL) and, for generative models, the kit on ``n`` samples."""
    seed_everything(seed)
    metrics = spec.evaluate(model)
    if spec.generative and spec.kit:
        from agm.metrics import classifier, sample_metrics

        # smoke: just above the 129 samples the FID's covariance of 128 features needs
        n = n or budget(10_000, 200)
        labels = torch.arange(n) % spec.num_classes if spec.conditional else None
        options = spec.metric_sample_options() if spec.metric_sample_options else {}
        start = time.perf_counter()
        with torch.no_grad():
            images = spec.sample(model, n, torch.Generator().manual_seed(seed), labels, **options)
        images = images.clamp(0, 1).float().cpu()
        metrics["samples_per_s"] = n / (time.perf_counter() - start)
        metrics |= sample_metrics(images)
        metrics |= {f"sample_{k}": v for k, v in options.items()}
        metrics["metrics_classifier_sha256"] = classifier()[1]
    return metrics


def cmd_evaluate(args) -> int:
    spec = registry.get(args.name)
    # the FID's covariance needs more samples than the classifier has features
    least = ClassifierConfig().features + 1
    if args.n is not None and not least <= args.n <= MAX_SAMPLES:
        raise UsageError(f"--n must be between {least} and {MAX_SAMPLES}, got {args.n}")
    if args.store and args.n is not None:
        raise UsageError("--store writes the metrics `train` writes, at the default n: drop --n")
    model = registry.load_model(spec.name)[0].to(device())  # cuda -> mps -> cpu
    set_threads()
    if args.full:
        if spec.evaluate_full is None:
            raise UsageError(f"{spec.name} has no --full evaluation")
        metrics = spec.evaluate_full(model)
        checkpoint.update_metrics(spec.name, metrics)
        print(f"stored in the manifest of {spec.name}:")
    else:
        metrics = all_metrics(spec, model, args.n, args.seed)
        if args.store:
            # how the previous metrics were sampled goes with them: a sampler option no longer used is dropped
            stored = checkpoint.read_manifest(spec.name).metrics
            stale = [k for k in stored if k.startswith("sample_") and k not in metrics]
            checkpoint.update_metrics(spec.name, metrics, drop=stale)
            print(f"stored in the manifest of {spec.name}:")
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        for k, v in metrics.items():
            print(f"{k:<28} {v:.6g}" if isinstance(v, float) else f"{k:<28} {v}")
    return 0


def _parse_sample(argv: list[str], parser: argparse.ArgumentParser):
    """The model's name decides which model-specific options exist (and what --help lists)."""
    if len(argv) < 2 or argv[1].startswith("-"):
        parser.parse_args(argv)  # prints the usage of `sample` and exits
    spec = registry.get(argv[1])
    model_parser = argparse.ArgumentParser(prog="python -m agm sample", description=spec.summary)
    _add_sample_arguments(model_parser)
    if spec.add_sample_options:
        spec.add_sample_options(model_parser.add_argument_group(f"options of {spec.name}"))
    args = model_parser.parse_args(argv[1:])
    common = {"name", "n", "seed", "out", "png", "label"}
    options = {k: v for k, v in vars(args).items() if k not in common}
    return args, spec, options


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        if argv[:1] == ["sample"]:
            args, spec, options = _parse_sample(argv, parser)
            return cmd_sample(args, spec, options)
        args = parser.parse_args(argv)
        return {"data": cmd_data, "list": cmd_list, "train": cmd_train, "evaluate": cmd_evaluate}[
            args.command
        ](args)
    except (KeyError, UsageError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    except (DataError, checkpoint.CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)  # a diverged run stops before anything is written
        return 1


if __name__ == "__main__":
    sys.exit(main())
