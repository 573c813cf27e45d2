"""``ray-ad``: train, evaluate and predict from the command line.

The later Ray jobs and the Serve deployment call the same library functions as these commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ray_ad import storage
from ray_ad.bundle import load_bundle, save_bundle
from ray_ad.config import apply_overrides, load_file
from ray_ad.data.images import load_image
from ray_ad.errors import ConfigError, RayADError
from ray_ad.methods import METHODS
from ray_ad.methods.base import Adaptable, Runtime
from ray_ad.pipeline import adapt_detector, evaluate_split, target_image_uris, train_detector, train_selected
from ray_ad.progress import configure_logging
from ray_ad.report import format_table
from ray_ad.selection import selection_table


def cmd_adapt(args: argparse.Namespace) -> int:
    detector = load_bundle(args.model, device=args.device)
    if not isinstance(detector, Adaptable):
        raise RayADError(f"{args.model} is a {detector.method} bundle; only ref_cfa source models can be adapted")
    target_images = target_image_uris(args.target, args.target_split)
    print(f"adapting {args.model} to {len(target_images)} unlabeled images of {args.target}")
    info = adapt_detector(detector, target_images, args.set, Runtime(not args.quiet, args.cache_dir))
    for key, value in info.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    metrics: dict[str, Any] = {"adapt": info}
    if args.eval_split:
        _, eval_metrics = evaluate_split(detector, args.target, args.eval_split, not args.quiet)
        metrics.update(eval_metrics)
        print(format_table({f"{detector.method} (adapted)": eval_metrics}))
    save_bundle(detector, args.out, metrics)
    print(f"saved adapted bundle to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    overrides = load_file(args.config) if args.config else {}
    overrides = apply_overrides(overrides, args.set or [])
    if args.device:
        overrides["device"] = args.device
    runtime = Runtime(not args.quiet, args.cache_dir)
    if args.select is not None:
        if len(args.data) > 1:
            raise RayADError("--select trains on exactly one dataset")
        detector, metrics = train_selected(args.select or None, args.data[0], overrides, args.calibration_fraction,
                                           runtime, evaluate=not args.no_eval)
        print(selection_table(metrics["selection"]))
    else:
        detector, metrics = train_detector(
            args.method, args.data if len(args.data) > 1 else args.data[0], overrides, args.calibration_fraction,
            runtime, evaluate=not args.no_eval,
        )
    if "image_auroc" in metrics:
        print(format_table({detector.method: metrics}))
    save_bundle(detector, args.out, metrics)
    print(f"saved {detector.method} bundle to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    detector = load_bundle(args.model, device=args.device)
    if args.scoring:
        if not detector.supports_inversion:
            raise RayADError(f"--scoring applies to osd_irf bundles, not {detector.method}")
        detector.set_scoring(args.scoring)
    if args.branch:
        if not detector.uses_references:
            raise RayADError(f"--branch applies to nagl bundles, not {detector.method}")
        detector.set_branch(args.branch)
    if args.shots:
        from ray_ad.fewshot import evaluate_draws, parse_shots

        metrics = evaluate_draws(detector, args.data, parse_shots(args.shots), args.draws, args.seed, not args.quiet)
        label = f"{detector.method} ({detector.branch}) {metrics['shots']}, mean of {args.draws}"
        print(format_table({label: metrics}))
        spread = [f"{key} ± {metrics[key + '_std']:.4f}" for key in ("image_auroc", "pixel_auroc")
                  if key + "_std" in metrics]
        print("spread over draws: " + ", ".join(spread))
        results = None
    elif detector.uses_references and getattr(detector, "references", None) is None:
        raise RayADError(f"{args.model} is a generalist without references: pass --shots K+A to draw them from "
                         f"{args.data}, or add a line's references with `ray-ad references add`")
    else:
        results, metrics = evaluate_split(detector, args.data, args.split, not args.quiet)
        print(format_table({detector.method: metrics}))
    if args.json:
        storage.write_text(args.json, json.dumps(metrics, indent=2))
        print(f"wrote {args.json}")
    if args.heatmaps:
        if results is None:
            raise RayADError("--heatmaps needs a single scoring run; it does not combine with --shots")
        from ray_ad.heatmaps import write_heatmaps

        count = write_heatmaps(results, args.heatmaps)
        print(f"wrote {count} heatmaps to {args.heatmaps}")
    return 0


def split_image_mask(item: str) -> tuple[str, str]:
    """``IMG:MASK`` -> (IMG, MASK), where either may be a URI with ``scheme://``."""
    separators = [i for i, char in enumerate(item) if char == ":" and item[i + 1 : i + 3] != "//"]
    if len(separators) != 1 or separators[0] in (0, len(item) - 1):
        raise ConfigError(f"--abnormal {item!r}: write IMAGE:MASK (one ':' between the image and its mask)")
    return item[: separators[0]], item[separators[0] + 1 :]


def cmd_references_add(args: argparse.Namespace) -> int:
    from ray_ad.methods.nagl.references import load_references

    detector = load_bundle(args.model, device=args.device)
    if not detector.uses_references:
        raise RayADError(f"{args.model} is a {detector.method} bundle; references belong to nagl models")
    if not args.normal:
        raise ConfigError("no normal reference: pass at least one image with --normal")
    if args.root and not args.line:
        raise ConfigError("--root publishes to a line: name it with --line")
    abnormal = [split_image_mask(item) for item in args.abnormal or []]
    references = load_references(args.normal, abnormal, detector.image_size)
    detector.set_references(references)
    metrics = {"references": {"normal": args.normal, "abnormal": [list(pair) for pair in abnormal]}}
    if args.root:
        from ray_ad.registry import publish

        version = publish(detector, args.root, args.line, metrics)
        print(f"published {references.shots} references as {args.line} version {version} under {args.root}")
    else:
        save_bundle(detector, args.out, metrics)
        print(f"saved a {references.shots} reference bundle to {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    detector = load_bundle(args.model, device=args.device)
    failures = 0
    rows = []
    for path in args.images:
        try:
            image = load_image(path, keep_gray=True)
        except RayADError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
            continue
        prediction = detector.predict(detector.preprocess(image)[None])
        score = float(prediction.pred_score[0])
        anomalous = bool(detector.decide(score))
        rows.append({"path": path, "score": score, "is_anomaly": anomalous, "threshold": detector.threshold})
        if not args.json:
            print(f"{path}\tscore={score:.4f}\t{'ANOMALY' if anomalous else 'normal'}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 1 if failures else 0


def cmd_landing_key(args: argparse.Namespace) -> int:
    """Print the marker key that lets a landing batch replace an existing line's model (admin only)."""
    from ray_ad.registry import check_name
    from ray_ad.serve.auth import Tokens
    from ray_ad.serve.landing import update_key

    admin = Tokens.load(args.tokens).admin
    if not admin:
        raise ConfigError("the token file has no admin token: only the admin may open a line to landing updates")
    key = update_key(admin, check_name("line", args.line), check_name("batch id", args.batch))
    print(json.dumps({"source_line": args.source_line, "update_line": key}) if args.source_line else key)
    return 0


def cmd_procedural(args: argparse.Namespace) -> int:
    """Write procedural texture domains (extra source domains for a nagl generalist); print their URIs."""
    from ray_ad.data.procedural import write_domains

    try:
        uris = write_domains(args.out, args.domains, args.normals, args.defects, args.size, args.seed,
                             args.test_normals)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    print("\n".join(uris))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-ad", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a detector on the normal images of a dataset")
    recipe = train.add_mutually_exclusive_group(required=True)
    recipe.add_argument("--method", choices=sorted(METHODS))
    recipe.add_argument("--select", nargs="?", const="", metavar="CANDIDATES",
                        help="train the candidate recipes of this YAML file (default configs/select.yaml) and keep "
                             "the one a label-free validation ranks first (held-out normals + pasted defects)")
    train.add_argument("--data", required=True, action="append",
                       help="MVTec folder URI, Parquet manifest URI, elpv:mono or elpv:poly (nagl: repeat it to "
                            "train on several source domains)")
    train.add_argument("--out", required=True, help="URI of the bundle folder to write")
    train.add_argument("--config", help="YAML/JSON file with method config values")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    train.add_argument("--calibration-fraction", type=float, default=0.1,
                       help="share of training normals held out for calibration (default 0.1)")
    train.add_argument("--cache-dir", help="local folder to cache backbone features in")
    train.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the config's, auto)")
    train.add_argument("--no-eval", action="store_true", help="skip evaluation on the test split")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a bundle on a labelled split")
    evaluate.add_argument("--model", required=True, help="bundle URI")
    evaluate.add_argument("--data", required=True, help="dataset URI (as for train)")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--json", help="write the metrics as JSON to this URI")
    evaluate.add_argument("--heatmaps", help="write overlay PNGs to this folder URI")
    evaluate.add_argument("--scoring", choices=("one_step", "inversion"), help="osd_irf scoring mode")
    evaluate.add_argument("--shots", metavar="K+A",
                          help="nagl: draw K normal references from the train split and A abnormal ones (with "
                               "masks) from the test split, score the rest (e.g. 4+1; 4+0 is the normal branch)")
    evaluate.add_argument("--draws", type=int, default=5, help="reference draws for --shots (default 5)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the first draw (default 0)")
    evaluate.add_argument("--branch", choices=("nagl", "normal", "naive"),
                          help="nagl: score with S_n alone (normal) or S_n + abnormal NN (naive: the paper's "
                               "setting iii)")
    evaluate.add_argument("--device")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    adapt = sub.add_parser("adapt", help="adapt a ref_cfa source model to an unlabeled target domain (CFA)")
    adapt.add_argument("--model", required=True, help="URI of the ref_cfa source bundle")
    adapt.add_argument("--target", required=True, help="target dataset URI; only its image paths are used")
    adapt.add_argument("--target-split", help="use only this split of the target (default: every image)")
    adapt.add_argument("--out", required=True, help="URI of the adapted bundle to write")
    adapt.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override cfa.*, train.* or target_init (e.g. cfa.temporal=false, train.steps=300)")
    adapt.add_argument("--eval-split", help="after adapting, evaluate on this labelled split of the target")
    adapt.add_argument("--cache-dir", help="local folder to cache backbone features in")
    adapt.add_argument("--device")
    adapt.add_argument("--quiet", action="store_true")
    adapt.set_defaults(func=cmd_adapt)

    predict = sub.add_parser("predict", help="score images with a bundle")
    predict.add_argument("--model", required=True, help="bundle URI")
    predict.add_argument("images", nargs="+", help="image URIs")
    predict.add_argument("--json", action="store_true", help="print JSON instead of lines")
    predict.add_argument("--device")
    predict.set_defaults(func=cmd_predict)

    references = sub.add_parser("references", help="a nagl line's reference images")
    references_sub = references.add_subparsers(dest="references_command", required=True)
    add = references_sub.add_parser("add", help="write a nagl model with a line's references (no training)")
    add.add_argument("--model", required=True, help="URI of the nagl bundle (the trained generalist)")
    add.add_argument("--normal", nargs="+", metavar="IMG", help="normal reference image URIs (at least one)")
    add.add_argument("--abnormal", nargs="*", metavar="IMG:MASK", help="abnormal references with their masks")
    target = add.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="URI of the bundle to write")
    target.add_argument("--root", help="registry root: publish as a new version of --line")
    add.add_argument("--line", help="the line to publish to (with --root)")
    add.add_argument("--device")
    add.set_defaults(func=cmd_references_add)

    procedural = sub.add_parser("procedural", help="write procedural texture domains with masked defects (extra "
                                "nagl source domains: --data each printed URI)")
    procedural.add_argument("--out", required=True, help="folder URI to write the domains under")
    procedural.add_argument("--domains", type=int, default=12, help="how many domains (default 12)")
    procedural.add_argument("--normals", type=int, default=80, help="normal images per domain (default 80)")
    procedural.add_argument("--defects", type=int, default=40, help="defective images per domain (default 40)")
    procedural.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    procedural.add_argument("--test-normals", type=int, default=0,
                            help="normal images per domain under test/good, to evaluate on (default 0)")
    procedural.add_argument("--seed", type=int, default=0)
    procedural.set_defaults(func=cmd_procedural)

    key = sub.add_parser("landing-key", help="admin: the _READY key that lets a landing batch update an existing line")
    key.add_argument("--line", required=True)
    key.add_argument("--batch", required=True, help="the batch folder's name under landing/<line>/")
    key.add_argument("--source-line", help="print a whole _READY marker with this source line")
    key.add_argument("--tokens", help="token file URI (default: $RAY_AD_TOKENS)")
    key.set_defaults(func=cmd_landing_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()  # the library logs its stages; the CLI shows them
    try:
        return args.func(args)
    except RayADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
