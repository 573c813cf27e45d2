"""REF+CFA's configuration: the head (S2), the alignment (T2) and the method as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ray_ad.backbones import BackboneConfig
from ray_ad.diffusion import ScoreNetConfig
from ray_ad.methods.base import DetectorConfig
from ray_ad.methods.ref_cfa.fields import FieldConfig
from ray_ad.normalisation import NormalisationConfig
from ray_ad.training import TrainConfig


@dataclass
class HeadConfig:
    d_model: int = 64
    heads: int = 4
    layers: int = 1
    embed_dim: int = 16
    hidden: int = 64
    steps: int = 600
    batch_images: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lambda_stat: float = 0.05  # weight of the stationarity/energy regulariser on normal patches
    lambda_sp: float = 0.05  # weight of the TV spatial prior
    # "auto": pixel masks where present, image labels otherwise, synthetic anomalies when the source
    # has no anomalous image at all; "mask" / "image" / "synthetic" force one kind.
    supervision: Literal["auto", "mask", "image", "synthetic"] = "auto"
    synthetic_ratio: float = 0.5  # synthetic anomalies per normal training image (synthetic supervision)

    def __post_init__(self) -> None:
        if self.supervision not in ("auto", "mask", "image", "synthetic"):
            raise ValueError(f"head.supervision must be auto, mask, image or synthetic, got {self.supervision!r}")
        if self.steps < 1 or self.batch_images < 1:
            raise ValueError(f"head.steps and head.batch_images must be >= 1, got {self.steps}, {self.batch_images}")


@dataclass
class CFAConfig:
    temporal: bool = True  # TA
    directional: bool = True  # DSA
    second_order: bool = True  # SFA
    rank: int = 8  # r of the top-r singular subspaces of stacked M
    ridge: float = 1e-4  # added to covariance eigenvalues before whitening
    # SFA: share of target cells left out of the target moments as outliers (0 = all cells, the paper)
    sfa_trim: float = 0.0
    # Statistic-direction alignment (ours, not the paper's; see the README): flip each signature
    # statistic whose direction on the unlabeled target differs from the source's.
    statistic_directions: bool = False
    # What witnesses a statistic's direction on the target, without labels: "tail" (the heavier tail of
    # its distribution over the target images) or "synthetic" (the way it moves in the cells where a
    # synthetic anomaly is pasted into target images, paired with the same cells before).
    direction_witness: Literal["tail", "synthetic"] = "tail"
    witness_images: int = 64  # target images that get a synthetic anomaly (direction_witness=synthetic)
    # TA applied by interpolating the stored per-step quantities between the target's steps ("resample",
    # which gives step 0 a change and a turn that never occur on the source), or by running the target
    # chain at the warped diffusion timesteps ("timesteps"; see align.warped_timesteps).
    temporal_mode: Literal["resample", "timesteps"] = "resample"
    ridge_relative: bool = False  # SFA ridge = ridge x each covariance's mean eigenvalue (not absolute)
    # Input alignment (ours): the target's g_phi inputs (tokens and log energies per step) matched per
    # coordinate to the source normals' median and spread, so the frozen, non-linear g_phi sees inputs
    # on the scale it was trained on. SFA only aligns what comes out of it.
    input_alignment: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.sfa_trim < 1:
            raise ValueError(f"cfa.sfa_trim must be in [0, 1), got {self.sfa_trim}")
        if self.direction_witness not in ("tail", "synthetic"):
            raise ValueError(f"cfa.direction_witness must be tail or synthetic, got {self.direction_witness!r}")
        if self.witness_images < 1:
            raise ValueError(f"cfa.witness_images must be >= 1, got {self.witness_images}")
        if self.temporal_mode not in ("resample", "timesteps"):
            raise ValueError(f"cfa.temporal_mode must be resample or timesteps, got {self.temporal_mode!r}")


TARGET_INITS = ("scratch", "source", "source_frozen")


@dataclass
class REFCFAConfig(DetectorConfig):
    # REF+CFA's own backbone default (a 16 x 16 grid); map_sigma, threshold_quantile, seed and device
    # are DetectorConfig's.
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(grid_size=16))
    score_net: ScoreNetConfig = field(default_factory=ScoreNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # both score networks (S1 and T1)
    # Each domain's features are normalised with that domain's own statistics (the target's from its
    # unlabeled images): per channel, or whitened per grid position (ray_ad/normalisation.py).
    normalisation: NormalisationConfig = field(default_factory=NormalisationConfig)
    fields: FieldConfig = field(default_factory=FieldConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    cfa: CFAConfig = field(default_factory=CFAConfig)
    # T1 starts from a fresh initialisation ("scratch", the paper's "train a target score network"),
    # from the source score network ("source": fine-tuning), or is S1 itself, untrained on the target
    # but re-standardised on the target's features ("source_frozen"); benchmarks measure all three.
    target_init: Literal["source", "scratch", "source_frozen"] = "scratch"
    # Robust T1 (label-free): share of the target images with the highest denoising loss under the first
    # T1 that a second pass leaves out (the target holds defects; S1 saw normals only). 0 = one pass.
    target_trim: float = 0.0
    top_p: float = 1.0  # image score = mean of the top p% pixels of the map

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.top_p <= 100:
            raise ValueError(f"top_p is a percentage in (0, 100], got {self.top_p}")
        if self.train.t_max and max(self.fields.timesteps) >= self.train.t_max:
            raise ValueError(f"fields.timesteps reach t = {max(self.fields.timesteps)}, outside the trained range "
                             f"train.t_max = {self.train.t_max}")
        if not 0 <= self.target_trim < 1:
            raise ValueError(f"target_trim must be in [0, 1), got {self.target_trim}")
        if self.target_init not in TARGET_INITS:
            raise ValueError(f"target_init must be one of {', '.join(TARGET_INITS)}; got {self.target_init!r}")
