"""Target memory: a line adapted to a new domain from its landed images alone, no label, no training.

The landed batch is scored against itself (mutual scoring, ``mutual.py``); the images and the cells
that stand out from the rest of the batch are dropped, and what remains (greedy-coreset subsampled
when large) becomes the line's memory bank. New images are scored as PatchCore does, except that a
cell's distance is to the nearest bank cell of the k-th distinct landed image that matches it
(``match_images``), so a defect the memory kept cannot vouch alone; the image score is the largest.
The backbone and its preprocessing are the source line's (see ``from_source``), so a target memory
serves wherever the source did.

The operating point comes from held-out landed images, which are unlabeled and contaminated:
``threshold.unlabeled_threshold`` fits their normal mode instead of taking a quantile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ray_ad.adaptation.mutual import (
    cells,
    greedy_coreset,
    kth_image_distance,
    mutual_scores,
    nearest_distance,
    score_against,
)
from ray_ad.adaptation.threshold import (
    RULES,
    SHAPES,
    fit_two_gaussians,
    normal_mode,
    unlabeled_threshold,
    upper_component,
)
from ray_ad.backbones import BackboneConfig
from ray_ad.data import Sample
from ray_ad.errors import DataError
from ray_ad.methods.base import Detector, DetectorConfig, Runtime, check_tensor_keys, on_source_backbone
from ray_ad.methods.patchcore.model import PatchCore

log = logging.getLogger(__name__)
MIN_IMAGES_TO_DROP = 8
DROP_RULES = ("z", "mixture")  # drop_mask's rules, by the scores alone
IMAGE_DROP_RULES = (*DROP_RULES, "share")  # and the one that also reads the landing's defect share
DROP_REFEREES = ("mutual", "source", "consensus", "auto")
RANKING_REFEREES = ("consensus", "auto")  # mean ranks: they need a count from elsewhere (rule "share")
SILENT_REFEREE_FALLBACKS = ("share", "mutual", "none")


def _default_backbone() -> BackboneConfig:
    # Stages 2-3, 3x3 neighbourhood average, 16x16 cells: where the label-free figures in DESIGN.md §5
    # were measured (PatchCore's mid-level features with local context).
    return BackboneConfig(layers=(2, 3), grid_size=16, local_pool=3)


@dataclass
class TargetMemoryConfig(DetectorConfig):
    # The threshold comes from ``threshold_rule`` on unlabeled landed images, not from
    # ``threshold_quantile`` (there are no known normals to take a quantile of).
    backbone: BackboneConfig = field(default_factory=_default_backbone)
    mutual_fraction: float = 0.3  # MuSc: mean of the lowest 30% of per-image nearest distances
    mutual_references: int = 64  # other images each landed image is compared with
    # Drop an image whose largest mutual cell score is this many sigma above the images' normal mode;
    # drop cells of the images kept likewise (None: keep them all). Chosen on magnetic_tile with 18%
    # of its defective images landed among its normals (a development set that is no elpv target;
    # the adaptation README has the table): dropping images at 3 sigma helps there a little, dropping
    # cells hurts, because rare normal structures score as high as defects cell by cell. Whether to
    # drop images at all was the gate's call per batch (``adaptation/promote.py`` builds the memory of
    # every landed image, candidate ``target_memory_all``, when ``candidates=[...]`` names it).
    drop_image_z: float | None = 3.0
    # How an image "stands out" by the referee's scores: "z" (more than ``drop_image_z`` robust spreads
    # above their normal mode), "mixture" (two Gaussians fitted to them by EM, as the threshold's mixture
    # shape; the images more likely under the upper one are dropped), or "share" (the referee's highest-
    # scored images, as many as the landing's defect share says are defective: the referee ranks, the
    # landing's mutual scores count; ``drop_image_z`` is then unused, but None still keeps every image).
    # The adaptation job's memory uses "share" with the source referee (adaptation/promote.py: chosen on
    # the development set, where it beat "z" on all three splits); standalone, with the mutual referee,
    # "z" (there the mutual scores' top share scored 0.757 against z's 0.821 on the development set).
    drop_image_rule: str = "z"
    # Which scores of the landed images the image drop reads: "mutual" (each image's largest mutual cell
    # score), or "source" (the source line's image scores, which ``fit`` then needs as
    # ``referee_scores``; the adaptation job passes them, and it is the adaptation's default). The
    # source never saw the landing's defects, so under a domain shift its scores may still rank them
    # where mutual scores, fooled by defects that recur and by rare normal kinds, rank them weakly: on
    # magnetic_tile seen by a new camera (the development set), flag AUROC 0.96 against 0.65-0.66 over
    # the landed images, and the memory 0.890 / 0.897 / 0.883 against 0.821 / 0.826 / 0.818 test image
    # AUROC over three splits (benchmarks/explorations/source_referee_drop.py; the adaptation README).
    # Standalone (``ray-ad train --method target_memory``) there is no source: "mutual".
    # "consensus" (rule "share" only): each image's mean rank under the source's scores and under its largest
    # mutual cell score, two referees that err differently (the source where the new domain's look is new to
    # it, the mutual scores where defects recur or normal kinds are rare).
    # "auto" (rule "share" only): "source" when the source's scores of the landed images part into two modes
    # at least as clearly as the mutual scores do (two Gaussians' separation, Ashman's D), else "consensus":
    # the landing shows whether the source can still tell its defects apart.
    drop_referee: str = "mutual"
    # When the source referee flags no landed image by rule "z" or "mixture" (under a domain shift its
    # scores of the landing can all move and spread, so none stands out from their normal mode), the
    # memory would be the memory of every image, the gate's other candidate, again. What decides then:
    # "share": the source's ranking still: its highest-scored images, as many as the landing's defect
    #   share (two Gaussians fitted to the landed images' mutual scores) says are defective;
    # "mutual": the mutual scores, by ``drop_image_rule`` (the earlier referee; on the development set
    #   dropping what they flag beats keeping every image, 0.759 against 0.747 test image AUROC);
    # "none": keep every image. (true / false in configs written before "share": "mutual" / "none".)
    # "share" was chosen on the development set, magnetic_tile seen by a new camera with a PatchCore
    # source: the memory without the source's top share scored 0.894 / 0.901 / 0.889 test image AUROC on
    # three splits, without the images the mutual scores flag 0.821 / 0.826 / 0.818 (adaptation README).
    silent_referee_fallback: bool | str = "share"
    drop_cell_z: float | None = None
    # None: every kept cell is in the bank (PatchCore at 100%). A number: greedy k-centre coreset to
    # that many cells, for a faster scorer. On a contaminated batch the k-centre picks the cells far
    # from all others first, which are the defect cells, so the coreset is no default here.
    bank_size: int | None = None
    # "nearest": a cell's distance to the nearest bank cell (PatchCore). "mutual": the memory keeps
    # ``reference_images`` whole landed images, and a cell scores as in mutual scoring against them
    # (nearest cell in each, lowest ``mutual_fraction`` averaged): a defect that recurs in a few landed
    # images then no longer vouches for itself.
    scoring: str = "nearest"
    reference_images: int = 128
    # "nearest" scoring: a cell's distance to the nearest cell of the k-th distinct landed image that
    # matches it (mutual.kth_image_distance; 1 is PatchCore's nearest cell). A defect that the memory kept
    # then vouches for a test defect only when k landed images share it. 2, chosen on magnetic_tile
    # (benchmarks/explorations/target_memory_kth_image.py; the adaptation README): on its contaminated
    # landing 2 wins most of what 3 wins (+5 to +6 AUROC points over 1, against +6 to +7), and on its
    # clean normals it costs half as much (-3 against -7): rare normal structure must recur too.
    match_images: int = 2
    # How held-out landed scores become a threshold (adaptation/threshold.py); "share" takes the defect
    # share from the landed images' mutual scores (as the adaptation gate does).
    threshold_rule: str = "share"
    false_alarm_rate: float = 0.01
    threshold_shape: str = "mixture"  # threshold.py: "mixture" (two Gaussians by EM), "gaussian" or "gumbel"

    @property
    def reads_source_scores(self) -> bool:
        """Whether the image drop reads the source line's scores of the landed images (``referee_scores``)."""
        return self.drop_image_z is not None and self.drop_referee in ("source", *RANKING_REFEREES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.mutual_fraction <= 1:
            raise ValueError(f"mutual_fraction must be in (0, 1], got {self.mutual_fraction}")
        if self.mutual_references < 1:
            raise ValueError(f"mutual_references must be positive, got {self.mutual_references}")
        if self.bank_size is not None and self.bank_size < 1:
            raise ValueError(f"bank_size must be positive, got {self.bank_size}")
        if self.threshold_rule not in RULES:
            raise ValueError(f"threshold_rule must be one of {', '.join(RULES)}, got {self.threshold_rule!r}")
        if self.threshold_shape not in SHAPES:
            raise ValueError(f"threshold_shape must be one of {', '.join(SHAPES)}, got {self.threshold_shape!r}")
        if self.reference_images < 1:
            raise ValueError(f"reference_images must be positive, got {self.reference_images}")
        if self.drop_image_rule not in IMAGE_DROP_RULES:
            raise ValueError(f"drop_image_rule must be one of {', '.join(IMAGE_DROP_RULES)}, "
                             f"got {self.drop_image_rule!r}")
        if self.drop_referee not in DROP_REFEREES:
            raise ValueError(f"drop_referee must be one of {', '.join(DROP_REFEREES)}, got {self.drop_referee!r}")
        if self.drop_referee in RANKING_REFEREES and self.drop_image_rule != "share":
            # Mean ranks are uniform whatever the landing: only a count from elsewhere can cut them.
            raise ValueError(f"drop_referee {self.drop_referee!r} ranks images and needs drop_image_rule 'share', "
                             f"got {self.drop_image_rule!r}")
        if self.match_images < 1:
            raise ValueError(f"match_images must be at least 1, got {self.match_images}")
        if isinstance(self.silent_referee_fallback, bool):  # a config written before "share"
            self.silent_referee_fallback = "mutual" if self.silent_referee_fallback else "none"
        if self.silent_referee_fallback not in SILENT_REFEREE_FALLBACKS:
            raise ValueError(f"silent_referee_fallback must be one of {', '.join(SILENT_REFEREE_FALLBACKS)}, "
                             f"got {self.silent_referee_fallback!r}")
        if self.scoring not in ("nearest", "mutual"):
            raise ValueError(f"scoring must be nearest or mutual, got {self.scoring!r}")
        if not 0 < self.false_alarm_rate < 0.5:
            raise ValueError(f"false_alarm_rate must be in (0, 0.5), got {self.false_alarm_rate}")


@dataclass
class LandedCells:
    """A landed batch read once on a memory's backbone: its cells, and their mutual scores once asked for.

    The adaptation job builds two memories of one batch and fits the landing's defect share to it; each
    would otherwise run the backbone over every landed image again and score the batch against itself
    again. ``TargetMemory.read_landing`` makes one; ``fit`` and ``landing_share`` take it.
    """

    paths: list[str]
    backbone: BackboneConfig
    features: torch.Tensor  # [N, L, C]: L cells of each landed image, on the CPU
    _mutual: dict[tuple[float, int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def mutual(self, fraction: float, references: int, seed: int) -> torch.Tensor:
        """Mutual scores ``[N, L]`` of every cell (computed on the first call for these settings)."""
        key = (fraction, references, seed)
        if key not in self._mutual:
            self._mutual[key] = mutual_scores(self.features, fraction, references, seed)
        return self._mutual[key]


class TargetMemory(PatchCore):
    """PatchCore's bank, map and bundle format; its own fit (from unlabeled landed images) and scoring."""

    method = "target_memory"

    def __init__(self, config: TargetMemoryConfig) -> None:
        super().__init__(config)
        self.defect_share: float | None = None  # of the landing it was fitted on (rule "share")

    @classmethod
    def from_source(cls, source: Detector, config: TargetMemoryConfig | None = None) -> TargetMemory:
        """A target memory on the source line's backbone network, weights and input size.

        The feature layers, grid and pooling stay the memory's own: they set how cells are compared,
        not how an image is read.
        """
        return cls(on_source_backbone(config or TargetMemoryConfig(), source))

    def read_landing(self, images: list[Sample], runtime: Runtime | None = None,
                     desc: str = "landed images") -> LandedCells:
        """The cells of ``images`` (unlabeled) on this memory's backbone, for ``fit`` and ``landing_share``."""
        features = cells(self.extract_features(images, runtime or Runtime(), desc=desc)).cpu()
        return LandedCells([sample.path for sample in images], self.config.backbone, features)

    def _landing(self, images: list[Sample], runtime: Runtime | None, landed: LandedCells | None,
                 desc: str) -> LandedCells:
        """``landed`` checked against ``images`` and this memory's backbone, or ``images`` read now."""
        if landed is None:
            return self.read_landing(images, runtime, desc)
        paths = [sample.path for sample in images]
        if landed.paths != paths:
            if len(landed.paths) != len(paths):
                raise DataError(f"the landed cells given were read from {len(landed.paths)} images, not the "
                                f"{len(paths)} to fit on")
            first = next(i for i, (a, b) in enumerate(zip(landed.paths, paths)) if a != b)
            raise DataError(f"the landed cells given were read from other images than those to fit on: image {first} "
                            f"is {landed.paths[first]!r} there and {paths[first]!r} here")
        if landed.backbone != self.config.backbone:
            raise DataError(f"the landed cells given were read with backbone {landed.backbone}, this memory reads "
                            f"{self.config.backbone}")
        return landed

    def _mutual(self, landed: LandedCells) -> torch.Tensor:
        cfg = self.config
        return landed.mutual(cfg.mutual_fraction, cfg.mutual_references, cfg.seed)

    def fit(self, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None,
            referee_scores: np.ndarray | None = None, landed: LandedCells | None = None) -> dict[str, Any]:
        """``train``: landed images (labels are never read); ``calibration``: held-out landed images;
        ``referee_scores``: the source line's score of each ``train`` image (``drop_referee: source``);
        ``landed``: ``train`` already read by ``read_landing`` (its mutual scores are reused too)."""
        if len(train) < 2:
            raise DataError(f"a target memory needs at least 2 landed images, got {len(train)}")
        referee = self._referee(len(train), referee_scores)
        runtime = runtime or Runtime()
        landed = self._landing(train, runtime, landed, "landed images")
        features = landed.features
        cfg = self.config
        keep_image = torch.ones(len(features), dtype=torch.bool)
        keep_cell = keep_image[:, None].expand(features.shape[:2])
        dropping = cfg.drop_image_z is not None or cfg.drop_cell_z is not None
        mutual = None
        # The landing's share is needed here only to calibrate now (the adaptation job fits it once for
        # every candidate); it comes free with the mutual scores the drop rule needs anyway, which a
        # ``landed`` read before (the job's) already holds.
        if dropping or (calibration and cfg.threshold_rule == "share"):
            mutual = self._mutual(landed)
        # The landing's defect share, for the "share" threshold rule (calibrate_unlabeled) and for how many
        # images a silent source referee drops (silent_referee_fallback "share").
        few = mutual is None or len(mutual) < MIN_IMAGES_TO_DROP  # no share: calibrate fits the scores' own
        self.defect_share = None if few else _share_standing_out(mutual)
        referee_used = None
        if dropping:
            keep_image, keep_cell, referee_used = self._kept(mutual, referee, self.defect_share or 0.0)
        if cfg.scoring == "mutual":
            kept = torch.nonzero(keep_image).flatten()
            generator = torch.Generator().manual_seed(cfg.seed)
            kept = kept[torch.randperm(len(kept), generator=generator)[: cfg.reference_images]].sort().values
            self.bank = features[kept].reshape(-1, features.shape[-1]).to(self.device)
            self.bank_owners = kept.repeat_interleave(features.shape[1]).to(self.device)
        else:
            candidates = features[keep_cell]
            owners = torch.arange(len(features))[:, None].expand(keep_cell.shape)[keep_cell]
            if cfg.bank_size is not None:
                chosen = greedy_coreset(candidates, cfg.bank_size, seed=cfg.seed)
                candidates, owners = candidates[chosen], owners[chosen]
            if cfg.match_images > 1 and len(torch.unique(owners)) < cfg.match_images:
                raise DataError(f"match_images={cfg.match_images} needs a memory of at least that many images; "
                                f"{len(torch.unique(owners))} of the {len(train)} landed images are kept")
            self.bank = candidates.to(self.device)
            self.bank_owners = owners.to(self.device)
        self.bank_paths = [sample.path for sample in train]
        info = {
            "landed_images": len(train),
            "dropped_images": int((~keep_image).sum()),
            "drop_referee": referee_used,
            "dropped_paths": [sample.path for sample, keep in zip(train, keep_image.tolist()) if not keep],
            "dropped_cells": int(keep_image.sum() * features.shape[1] - keep_cell.sum()),
            "bank_size": len(self.bank),
            "defect_share": self.defect_share,
        }
        log.info("target memory: %s", info)
        if calibration:
            info["threshold"] = self.calibrate_unlabeled(calibration, runtime)
        return info

    def _referee(self, count: int, referee_scores: np.ndarray | None) -> torch.Tensor | None:
        """The source's image scores the drop reads (``drop_referee`` source, consensus or auto), checked;
        else None."""
        if not self.config.reads_source_scores:
            return None
        if referee_scores is None:
            raise DataError(f"drop_referee {self.config.drop_referee!r} needs the source line's scores of the "
                            "landed images (referee_scores); the adaptation job passes them, or set "
                            "memory.drop_referee=mutual")
        scores = torch.as_tensor(np.asarray(referee_scores, dtype=np.float32))
        if scores.shape != (count,) or not torch.isfinite(scores).all():
            raise DataError(f"referee_scores must be {count} finite image scores, one per landed image; "
                            f"got shape {tuple(scores.shape)}")
        return scores

    def _kept(self, mutual: torch.Tensor, referee: torch.Tensor | None = None, share: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
        """Which landed images ``[N]`` and cells ``[N, L]`` stay, and which referee dropped the images:
        images by ``referee`` (the source's image scores ``[N]``) when given, else by their largest mutual
        score (``drop_referee: consensus``: by their mean rank under both), under ``drop_image_rule``
        (``share``: the referee's top ``share`` of the images, the landing's defect share); under "z" or
        "mixture", when the source referee flags none, as ``silent_referee_fallback`` says; cells by their
        mutual scores ``[N, L]``."""
        cfg = self.config
        keep_image = torch.ones(len(mutual), dtype=torch.bool)
        used = None
        if cfg.drop_image_z is not None:
            scores, used = (mutual.amax(1), "mutual") if referee is None else (referee, "source")
            if referee is not None and cfg.drop_referee in RANKING_REFEREES:
                scores, used = self._consensus_or_source(referee, mutual.amax(1))
            if cfg.drop_image_rule == "share":
                dropped, used = top_share(scores, share), f"{used}, its top share"
            else:
                dropped = drop_mask(scores, cfg.drop_image_rule, cfg.drop_image_z)
                silent_source = referee is not None and not dropped.any()
                if silent_source and cfg.silent_referee_fallback == "mutual":
                    dropped = drop_mask(mutual.amax(1), cfg.drop_image_rule, cfg.drop_image_z)
                    used = "mutual (the source flagged none)"
                elif silent_source and cfg.silent_referee_fallback == "share":
                    dropped, used = top_share(referee, share), "source, its top share (none stood out)"
            keep_image = ~dropped
        keep_cell = keep_image[:, None].expand_as(mutual)
        if cfg.drop_cell_z is not None:
            centre, spread = normal_mode(mutual[keep_image].flatten().numpy())
            keep_cell = keep_cell & (mutual <= centre + cfg.drop_cell_z * spread)
        return keep_image, keep_cell, used

    def _consensus_or_source(self, referee: torch.Tensor, mutual: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The drop's scores ``[N]`` and what they are, under ``drop_referee`` "consensus" or "auto"."""
        consensus = mean_rank(referee, mutual), "consensus of the source and the mutual scores"
        if self.config.drop_referee == "consensus":
            return consensus
        if len(referee) < MIN_IMAGES_TO_DROP:  # no modes to compare (and no share: nothing is dropped)
            return referee, f"source ({len(referee)} landed images are too few to compare referees)"
        source_d, mutual_d = (fit_two_gaussians(scores.numpy()).separation for scores in (referee, mutual))
        evidence = f"(separation {source_d:.2f} against the mutual scores' {mutual_d:.2f})"
        if source_d >= mutual_d:
            return referee, f"source {evidence}"
        return consensus[0], f"{consensus[1]} {evidence}"

    def kept_images(self, landed: LandedCells, referee_scores: np.ndarray | None = None
                    ) -> tuple[torch.Tensor, str | None]:
        """Which landed images ``[N]`` this memory's image drop keeps, and which referee dropped the
        rest (None: no drop): what ``fit`` keeps, for another candidate fitted on the same images."""
        if self.config.drop_image_z is None:
            return torch.ones(len(landed.paths), dtype=torch.bool), None
        referee = self._referee(len(landed.paths), referee_scores)
        mutual = self._mutual(landed)
        share = _share_standing_out(mutual)
        keep_image, _, used = self._kept(mutual, referee, share)
        return keep_image, used

    def mutual_suspects(self, images: list[Sample], z: float, runtime: Runtime | None = None) -> np.ndarray:
        """Which of ``images`` (unlabeled) stand out from the others: largest mutual cell score more than
        ``z`` robust spreads above the images' normal mode (the rule that drops landed images)."""
        features = cells(self.extract_features(images, runtime or Runtime(), desc="held-out landed images"))
        cfg = self.config
        mutual = mutual_scores(features, cfg.mutual_fraction, cfg.mutual_references, cfg.seed)
        return _standing_out(mutual.amax(1), z).numpy()

    def landing_share(self, images: list[Sample], runtime: Runtime | None = None,
                      landed: LandedCells | None = None) -> float:
        """Share of ``images`` (unlabeled) that are defective, by two Gaussians fitted to their largest
        mutual cell scores (0 when one Gaussian explains them as well): a property of the landing, the
        same for every candidate model, from every landed image rather than the gate's held-out few.
        ``landed``: ``images`` already read by ``read_landing``."""
        if len(images) < MIN_IMAGES_TO_DROP:
            return 0.0
        return _share_standing_out(self._mutual(self._landing(images, runtime, landed, "landed images (defect share)")))

    def calibrate_unlabeled(self, images: list[Sample], runtime: Runtime | None = None) -> float:
        """Threshold from unlabeled, possibly contaminated held-out images of the domain (rule "share": the
        landing's share from ``fit`` when it computed one, else two Gaussians fitted to these scores)."""
        features = self.extract_features(images, runtime or Runtime(), desc="held-out landed images")
        scores = torch.cat([self._cell_scores(chunk.to(self.device)).flatten(1).amax(1).cpu()
                            for chunk in features.split(16)])
        cfg = self.config
        self.threshold = unlabeled_threshold(scores.numpy(), cfg.false_alarm_rate, cfg.threshold_rule,
                                             shape=cfg.threshold_shape, share=self.defect_share)
        return self.threshold

    def _cell_scores(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.config.scoring == "mutual":
            references = self.bank.view(-1, h * w, c)
            fraction = self.config.mutual_fraction
            return torch.stack([score_against(q, references, fraction) for q in queries]).view(b, h, w)
        if self.config.match_images > 1:
            return kth_image_distance(queries.reshape(-1, c), self.bank, self.bank_owners,
                                      self.config.match_images).view(b, h, w)
        return nearest_distance(queries.reshape(-1, c), self.bank).view(b, h, w)

    def predict_without(self, images: torch.Tensor, excluded: list[tuple[str, ...]]) -> Any:
        raise NotImplementedError("a target memory has no leave-images-out scoring (PatchCore's predict_without)")

    def tensors(self) -> dict[str, torch.Tensor]:
        # Which landed image each bank cell came from: the k-th-image scoring needs it (a bundle written
        # before match_images existed has no record, and is saved again as it was).
        if self.bank_owners is None:
            return {"bank": self.bank}
        return {"bank": self.bank, "bank_owners": self.bank_owners.to(torch.int32)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "bank_owners" not in tensors:
            # Written before match_images existed: fitted and calibrated with the nearest cell, so it scores so.
            check_tensor_keys({"bank"}, tensors)
            log.warning("target memory bundle without bank_owners: scoring by the nearest cell (match_images=1)")
            self.config = replace(self.config, match_images=1)
            self.bank, self.bank_owners = tensors["bank"].to(self.device), None
        else:
            check_tensor_keys({"bank", "bank_owners"}, tensors)
            self.bank = tensors["bank"].to(self.device)
            self.bank_owners = tensors["bank_owners"].long().to(self.device)
        self.bank_paths = []


__all__ = ["LandedCells", "TargetMemory", "TargetMemoryConfig"]


def drop_mask(image_scores: torch.Tensor, rule: str = "z", z: float = 3.0) -> torch.Tensor:
    """Which images stand out by their (mutual) scores ``[N]``: by ``rule`` "z", more than ``z`` spreads
    above the normal mode; by "mixture", more likely under the upper of two Gaussians fitted by EM (none
    when one Gaussian explains the scores as well, by BIC). None of a handful of images, which has no
    mode to stand out from."""
    if rule not in DROP_RULES:
        raise ValueError(f"drop rule must be one of {', '.join(DROP_RULES)}, got {rule!r}")
    if len(image_scores) < MIN_IMAGES_TO_DROP:
        return torch.zeros(len(image_scores), dtype=torch.bool)
    if rule == "mixture":
        return torch.from_numpy(upper_component(image_scores.numpy()))
    return _standing_out(image_scores, z)


def top_share(image_scores: torch.Tensor, share: float) -> torch.Tensor:
    """The ``share`` of images ``[N]`` with the highest scores (rounded to a count; none for share 0)."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    dropped = torch.zeros(len(image_scores), dtype=torch.bool)
    dropped[image_scores.argsort(descending=True)[: round(share * len(image_scores))]] = True
    return dropped


def mean_rank(*scores: torch.Tensor) -> torch.Tensor:
    """Each image's mean rank (0: lowest) under several referees' scores ``[N]`` each; equal scores are
    ranked by position."""
    return torch.stack([torch.as_tensor(score).argsort(stable=True).argsort().float() for score in scores]).mean(0)


def _share_standing_out(mutual: torch.Tensor) -> float:
    """Defect share of images with mutual cell scores ``[N, L]``: the weight of the upper of two Gaussians
    fitted to their largest cell scores (0 for a handful of images, or when one Gaussian does as well)."""
    return fit_two_gaussians(mutual.amax(1).numpy()).share if len(mutual) >= MIN_IMAGES_TO_DROP else 0.0


def _standing_out(image_scores: torch.Tensor, z: float) -> torch.Tensor:
    """Images whose score is more than ``z`` spreads above the normal mode; none of a handful of images."""
    if len(image_scores) < MIN_IMAGES_TO_DROP:
        return torch.zeros(len(image_scores), dtype=torch.bool)
    centre, spread = normal_mode(image_scores.numpy())
    return image_scores > centre + z * spread
