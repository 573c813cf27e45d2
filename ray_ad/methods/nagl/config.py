"""NAGL's configuration: the proxies and attention layers, the loss weights, and episodic training."""

from __future__ import annotations

from dataclasses import dataclass, field

from ray_ad.backbones import BackboneConfig
from ray_ad.data.synthetic import ANOMALY_SOURCES, FILL_SOURCES
from ray_ad.methods.base import DetectorConfig

SYNTHETIC_MODES = ("auto", "always", "never")


@dataclass
class EpisodeConfig:
    """Episodic training (NAGL Sec. "Loss & Training"): every item is one query with its own reference set
    (K normal references and one abnormal reference with its mask) drawn from the query's domain."""

    steps: int = 800  # optimiser steps; the authors run 20 epochs x 500 episodes on a GPU
    batch_size: int = 8  # episodes per step
    lr: float = 1e-3  # AdamW; the authors start at 1e-5 for 10,000 episodes of a 24M-parameter head
    # The learning rate drops 10x at these shares of the budget (the authors: epochs 10 and 15 of 20).
    lr_drops: tuple[float, ...] = (0.5, 0.75)
    shots: tuple[int, ...] = (1, 2, 4)  # K is drawn from these per episode (the authors' K_1 in [1, 2, 4])
    anomaly_probability: float = 0.5  # share of queries that are anomalous
    # Share of episodes whose abnormal reference comes without its mask (the whole image marked), as a
    # line of a dataset without pixel masks gives it (elpv): RM then trains on the region NAGL estimates
    # for such a reference at inference (``unmasked_region``), not only on exact source masks. Ours; the
    # paper always has masks. Off: at 0.5 NAGL moves by at most a seed spread on elpv (README table).
    maskless_references: float = 0.0
    # Pair an abnormal query with an abnormal reference of its own defect type (the authors' episodes;
    # the paper's text does not say). Unpaired, the reference tells the query nothing about what to look
    # for, and RM/AFL can learn to ignore it; paired, they are trained to find what the reference shows.
    # On: chosen on the held-out procedural -> magnetic_tile task, no elpv read (README).
    pair_defects: bool = True
    # Synthetic anomalies with their masks (data/synthetic.py): "auto" for domains that have no pixel
    # masks (elpv), "always" adds them to every domain (magnetic_tile + synthetic), "never" real only.
    synthetic: str = "always"
    synthetic_count: int = 160  # synthetic anomalous images made per domain (one backbone pass each)
    max_normals: int = 240  # normal images per domain kept as references and normal queries
    opacity: tuple[float, float] = (0.2, 1.0)
    fill_sources: tuple[str, ...] = FILL_SOURCES

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"train: steps >= 1, batch_size >= 1, lr > 0; got {self}")
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"train.shots must be positive reference counts, got {list(self.shots)}")
        if not 0 <= self.anomaly_probability <= 1:
            raise ValueError(f"train.anomaly_probability must be in [0, 1], got {self.anomaly_probability}")
        if not 0 <= self.maskless_references <= 1:
            raise ValueError(f"train.maskless_references must be in [0, 1], got {self.maskless_references}")
        if self.synthetic not in SYNTHETIC_MODES:
            raise ValueError(f"train.synthetic must be one of {', '.join(SYNTHETIC_MODES)}, got {self.synthetic!r}")
        if self.synthetic_count < 0 or self.max_normals < 2:
            raise ValueError(f"train: synthetic_count >= 0 and max_normals >= 2; got {self}")
        if any(not 0 < share < 1 for share in self.lr_drops):
            raise ValueError(f"train.lr_drops must be shares of the budget in (0, 1), got {list(self.lr_drops)}")
        if not self.fill_sources or not set(self.fill_sources) <= set(ANOMALY_SOURCES):
            raise ValueError(f"train.fill_sources must be among {list(ANOMALY_SOURCES)}, got {list(self.fill_sources)}")


@dataclass
class NAGLLossWeights:
    """L = L_cls + lambda * L_seg, L_seg = Focal + Dice (NAGL, "Loss & Training"); lambda = 1."""

    cls: float = 1.0
    seg: float = 1.0  # lambda
    focal_gamma: float = 2.0
    # Weight of Focal + Dice on S_a alone, added to L_seg. 0: the paper's text (L_seg on the fused S only).
    # The authors' code puts its focal loss on each branch's map separately (``pixel_level_logits =
    # cat([s_n, s_a])``); S_n has no parameter, so what that adds to training is S_a learning the mask on
    # its own rather than only what corrects S_n on the source.
    anomaly_branch: float = 0.0

    def __post_init__(self) -> None:
        if self.anomaly_branch < 0:
            raise ValueError(f"loss.anomaly_branch must be >= 0, got {self.anomaly_branch}")


@dataclass
class NAGLConfig(DetectorConfig):
    # The largest shipped ImageNet backbone, lite2 (stages 2 and 3 on a 32 x 32 grid, C = 168; the paper's
    # ViT-S has no weights here). It won the held-out procedural -> magnetic_tile choice over lite0, the
    # project's patchcore features (NAGL N4+A1 0.726 against 0.689, README); no elpv figure chose it.
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="tf_efficientnet_lite2", layers=(2, 3), grid_size=32))
    proxies: int = 25  # M, the learnable proxies P (the authors' M = 25)
    # Scale of the proxies' random start. The authors' proxies are an ``nn.Embedding``: N(0, 1), which is
    # also the scale of features in the references' standard units. 0.02 (our first version) starts them
    # near zero, where every proxy attends alike.
    proxy_init_std: float = 0.02
    heads: int = 4  # attention heads of every layer (the authors': 4; d_model is the feature dimension C)
    # Add the 2D sine embedding of each cell's place on the grid to the keys of RM's and AFL's
    # cross-attention (K_1, K_2), as the authors' code does (the paper does not mention it). Off: the
    # paper's text. See the README.
    key_positions: bool = False
    mask_value: float = -1e9  # alpha in M' = alpha (1 - M^a)
    top_fraction: float = 0.01  # T_0.01: the image score is the mean of the top 1% of cells
    decision_threshold: float = 0.5  # on the image score, which L_cls trains as a probability
    # Put every feature in the normal references' per-channel standard units before any cosine (ours:
    # the lite backbones' features are non-negative, so all their cosines sit near 1; ViT tokens are not).
    standardise: bool = True
    # An abnormal reference whose mask marks the whole image (a dataset without pixel masks) gets as its
    # defect region M^a its top `unmasked_region` share of cells by S_n: 0.02, the median defect area of
    # magnetic_tile's masks on the 32 x 32 grid (1.4%), rounded up. 0 keeps the whole image, as given.
    unmasked_region: float = 0.02
    # S_a measured from the query's own median cell (S_a - median_i S_a), in training and at inference
    # (ours). AFL's proxies P^ are weighted sums of the query's own features (V_2 = F^q), so S_a's level
    # over a whole image follows how alike the image's cells are, not only its defects; centring keeps
    # what sets a cell apart from the rest of its image. Off: the paper's S_a. See the README.
    centre_anomaly_map: bool = False
    train: EpisodeConfig = field(default_factory=EpisodeConfig)
    loss: NAGLLossWeights = field(default_factory=NAGLLossWeights)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.proxy_init_std > 0:
            raise ValueError(f"proxy_init_std must be > 0, got {self.proxy_init_std}")
        if self.proxies < 1 or self.heads < 1:
            raise ValueError(f"proxies and heads must be >= 1, got {self.proxies}, {self.heads}")
        if not 0 <= self.unmasked_region <= 1:
            raise ValueError(f"unmasked_region must be in [0, 1] (0: the whole image), got {self.unmasked_region}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.mask_value >= 0:
            raise ValueError(f"mask_value (alpha) must be a large negative number, got {self.mask_value}")
