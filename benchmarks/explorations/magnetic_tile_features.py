"""Can another copy of the features lift OSD-IRF's magnetic_tile pixel AUROC? Feature copies measured on
the closed-form Gaussian reference.

    .venv/bin/python benchmarks/explorations/magnetic_tile_features.py [--data DIR] [--name NAME]

With per-position whitening and the Gaussian skip, the untrained score network's one-step IRF is
sqrt(alpha_bar_t (1 - alpha_bar_t)) times the whitened features (OSD-IRF README), so its Eq. 8 map
ranks pixels exactly as the norm of the whitened cell. That map needs no training, so a feature
variant costs one extraction and one whitening fit. Variants, each on top of the recipe's features
(stages 1-3 at 16 x 16, 3 x 3 and 11 x 11 pooled copies):

- the recipe as is (must match ``magnetic_tile_pixels.py``'s Gaussian reference, 0.851);
- stage 4 added (a deeper, coarser stage: more context per cell);
- a self-reference copy: each cell minus the median cell of its own tile, of its grid row, or of its
  grid column. "Uneven" masks cover a band of the tile whose texture is ordinary but differs from the
  rest of the same tile; a copy relative to the tile itself could see that where a model of normal
  tiles cannot.

Reported per variant: pooled pixel AUROC; all anomalous pixels against normal tiles' pixels and
against the unmarked pixels of defective images; "uneven"'s marked against its own unmarked pixels;
image AUROC of the map's maximum (not the Eq. 9 score), as a check that a variant does not buy
pixels with images. Then what a pooled 0.90 would need against the unmarked pixels of defective
images. About 5 CPU-minutes on 2 cores. Figures go to benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

# benchmarks/ (the shared _common and the main benchmarks) and this folder (the other explorations)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, machine, require_dataset, save, splits  # noqa: E402
from magnetic_tile import CONFIGS, pixel_auroc_by_negatives  # noqa: E402

from ray_ad.backbones.extractor import BackboneConfig, FeatureExtractor  # noqa: E402
from ray_ad.data import ImageDataset, Sample  # noqa: E402
from ray_ad.methods.base import upsample_map  # noqa: E402
from ray_ad.metrics import auroc  # noqa: E402
from ray_ad.normalisation import FeatureNormaliser, NormalisationConfig  # noqa: E402

MAP_SIGMA = 4.0  # the recipe's blur, pixels at 256 px


def tile_median(features: torch.Tensor) -> torch.Tensor:
    return features.flatten(2).median(dim=2).values[..., None, None].expand_as(features)


def row_median(features: torch.Tensor) -> torch.Tensor:  # median over the cells of each grid row
    return features.median(dim=3, keepdim=True).values.expand_as(features)


def column_median(features: torch.Tensor) -> torch.Tensor:  # median over the cells of each grid column
    return features.median(dim=2, keepdim=True).values.expand_as(features)


# name -> (extra backbone stages, the reference a self-reference copy is taken against, or None)
VARIANTS: dict[str, tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "recipe (stages 1-3, pools 3 and 11)": ((), None),
    "+ stage 4": ((4,), None),
    "+ copy minus its tile's median cell": ((), tile_median),
    "+ copy minus its grid row's median cell": ((), row_median),
    "+ copy minus its grid column's median cell": ((), column_median),
}


@torch.no_grad()
def extract(extractor: FeatureExtractor, samples: list[Sample], desc: str) -> dict[str, torch.Tensor | list[str]]:
    dataset = ImageDataset(samples, extractor.preprocessor)
    features, masks, labels, paths = [], [], [], []
    for batch in tqdm(DataLoader(dataset, batch_size=32), desc=desc, leave=False):
        features.append(extractor(batch["image"]))
        masks.append(batch["mask"][:, 0].bool())
        labels.append(batch["label"])
        paths.extend(batch["path"])
    return {"features": torch.cat(features), "masks": torch.cat(masks), "labels": torch.cat(labels), "paths": paths}


def with_copy(features: torch.Tensor, reference: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    return features if reference is None else torch.cat([features, features - reference(features)], dim=1)


def reference_maps(train: torch.Tensor, test: torch.Tensor, ridge: float) -> np.ndarray:
    """The Gaussian reference's pixel maps up to a constant factor: the norm of each whitened test cell."""
    normaliser = FeatureNormaliser(NormalisationConfig("position_whiten", ridge), train.shape[1], train.shape[-1])
    normaliser.fit(train)
    cells = torch.cat([normaliser(part).norm(dim=1) for part in test.split(64)])
    return upsample_map(cells, 256, MAP_SIGMA).numpy()


def needed_within_defective(test: dict, pooled_target: float, against_normal_tiles: float) -> tuple[float, float]:
    """The pooled pixel AUROC is the negatives-weighted mean of the AUROCs against each group of normal
    pixels, so a pooled target needs this AUROC against the unmarked pixels of defective tiles (given the
    one against normal tiles' pixels). Returns (that share of the normal pixels, the AUROC needed)."""
    masks, defective = test["masks"].numpy(), test["labels"].numpy() == 1
    unmarked = float((~masks[defective]).sum())
    share = unmarked / (unmarked + float(masks[~defective].size))
    return share, (pooled_target - (1 - share) * against_normal_tiles) / share


def figures(maps: np.ndarray, test: dict) -> dict[str, float]:
    masks, labels = test["masks"].numpy(), test["labels"].numpy()
    kinds = np.array([Path(p).parent.name for p in test["paths"]])
    defective, uneven = labels == 1, kinds == "uneven"
    by_negatives = pixel_auroc_by_negatives(maps, masks, labels)
    return {
        "pixel_auroc": auroc(maps.ravel(), masks.ravel()),
        "anomalous_vs_normal_tiles": by_negatives["vs_normal_images"],
        "anomalous_vs_unmarked_of_defective": by_negatives["vs_normal_pixels_of_defective_images"],
        "uneven_marked_vs_its_unmarked": auroc(maps[uneven].ravel(), masks[uneven].ravel()),
        "image_auroc_of_map_max": auroc(maps.reshape(len(maps), -1).max(1), defective),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--name", default="magnetic_tile_features")
    args = parser.parse_args()
    require_dataset(args.data)
    recipe = yaml.safe_load((CONFIGS / "osd_irf_magnetic_tile.yaml").read_text())
    ridge = float(recipe["normalisation"]["ridge"])
    train_samples, _, test_samples = splits(args.data)  # the detector's split: whitening fitted on train only

    extracted: dict[tuple[int, ...], tuple[dict, dict]] = {}
    rows = {}
    for name, (extra_stages, reference) in VARIANTS.items():
        if extra_stages not in extracted:
            backbone = {**recipe["backbone"], "layers": tuple(recipe["backbone"]["layers"]) + extra_stages,
                        "local_pool": tuple(recipe["backbone"]["local_pool"])}
            extractor = FeatureExtractor(BackboneConfig(**backbone))
            extracted[extra_stages] = (extract(extractor, train_samples, "train features"),
                                       extract(extractor, test_samples, "test features"))
        train, test = extracted[extra_stages]
        maps = reference_maps(with_copy(train["features"], reference), with_copy(test["features"], reference), ridge)
        rows[name] = figures(maps, test)
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[name].items()), flush=True)

    keys = list(next(iter(rows.values())))
    lines = ["Gaussian reference of the OSD-IRF magnetic_tile recipe (whitened-cell norm, map_sigma 4), test split:",
             "", "| variant | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys),
             *(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |" for name, row in rows.items())]
    recipe_row = next(iter(rows.values()))
    share, needed = needed_within_defective(test, 0.90, recipe_row["anomalous_vs_normal_tiles"])
    lines += ["", f"unmarked pixels of defective tiles are {share:.1%} of the test's normal pixels: a pooled pixel "
              f"AUROC of 0.90 needs {needed:.3f} against them (given the recipe's "
              f"{recipe_row['anomalous_vs_normal_tiles']:.3f} against normal tiles' pixels)"]
    text = "\n".join(lines)
    print(text)
    save(args.name, {"rows": rows, "unmarked_share_of_normal_pixels": share, "needed_for_0.90": needed,
                     "recipe_backbone": recipe["backbone"], "map_sigma": MAP_SIGMA, "machine": machine()}, text)


if __name__ == "__main__":
    main()
