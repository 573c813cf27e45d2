"""Score a folder (or dataset) of images with a line's current model on a Ray Data actor pool.

    python jobs/score_batch.py --line tiles --images s3://bucket/incoming/2026-11-23 --root s3://bucket/fleet
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/score_batch.py ...

Writes Parquet with one row per image (path, score, decision, model_version, error) to --out, by
default next to an input folder: <images>_scores/<line>/<version>/ (for elpv:... or a manifest:
<root>/scores/<line>/<version>/). An unreadable image gets a row with
its error instead of stopping the job.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from ray_ad.distributed.job_args import add_common, run
from ray_ad.progress import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--line", required=True, help="product line whose CURRENT model scores the images")
    parser.add_argument("--images", required=True, help="folder of images, or a dataset URI (labels unused)")
    parser.add_argument("--split", help="only this split of a dataset")
    parser.add_argument("--out", help="Parquet folder URI (default: next to the input folder)")
    parser.add_argument("--actors", type=int, default=1, help="scoring actors, one model load each (default 1)")
    parser.add_argument("--gpus", action="store_true", help="one GPU per actor")
    parser.add_argument("--batch-size", type=int, default=16, help="images per actor batch (default 16)")
    add_common(parser, training=False)
    args = parser.parse_args(argv)
    configure_logging()  # the library's INFO lines (stages, progress) into the job's log

    def body() -> None:
        from ray_ad.distributed.batch import score_batch
        from ray_ad.pipeline import target_image_uris

        images = target_image_uris(args.images, args.split)
        out, version = score_batch(args.root, args.line, images, args.out, args.images, args.actors, args.gpus,
                                   args.batch_size)
        print(f"scored {len(images)} images with {args.line}/{version}: {out}")

    return run(args, body)


if __name__ == "__main__":
    sys.exit(main())
