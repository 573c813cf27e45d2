"""Ray Train on a real local cluster: the distributed loop equals the local one, survives a killed worker."""

from __future__ import annotations

import pytest
import torch

from ray_ad.diffusion import NoiseSchedule, ScoreNetConfig, build_score_net
from ray_ad.distributed.train import RayScoreNetTrainer, RayTrainSettings
from ray_ad.training import TrainConfig, train_score_net

CONFIG = TrainConfig(steps=40, batch_size=8, warmup_steps=5, lr=1e-3)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_score_net(ScoreNetConfig(kind="dit", hidden=32, depth=1, heads=2), 8, 4)


def _features() -> torch.Tensor:
    return torch.randn(32, 8, 4, 4, generator=torch.Generator().manual_seed(1))


def test_one_ray_worker_trains_exactly_like_the_local_loop(ray_cluster, tmp_path):
    local_net, local_losses = train_score_net(_net(), _features(), NoiseSchedule(), CONFIG, seed=3, progress=False)
    settings = RayTrainSettings(workers=1, storage_path=str(tmp_path), name="one", checkpoint_every=15)
    trainer = RayScoreNetTrainer(settings)
    ray_net, ray_losses = trainer(_net(), _features(), NoiseSchedule(), CONFIG, seed=3, progress=False)
    assert len(ray_losses) == CONFIG.steps
    assert ray_losses == local_losses  # same seed, same batches, same noise: the same run
    for a, b in zip(local_net.state_dict().values(), ray_net.state_dict().values()):
        torch.testing.assert_close(a, b)
    # Checkpoints landed in the storage path, and the last one holds the final step.
    assert any(p.name.startswith("checkpoint_") for p in (tmp_path / "one-net1").iterdir())
    assert trainer.last_result.metrics["step"] == CONFIG.steps


def test_two_workers_resume_after_one_is_killed(ray_cluster, tmp_path):
    trainer = RayScoreNetTrainer(RayTrainSettings(
        workers=2, storage_path=str(tmp_path), name="drill", checkpoint_every=10, kill_worker_at_step=25,
    ))
    net, losses = trainer(_net(), _features(), NoiseSchedule(), CONFIG, seed=0, progress=False)
    metrics = trainer.last_result.metrics
    assert metrics["step"] == CONFIG.steps
    assert metrics["started_from_step"] == 20  # restarted from the last checkpoint before the kill at 25
    assert len(losses) == CONFIG.steps  # the first 20 losses came back from the checkpoint
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10  # and training went on learning


def test_the_cost_filter_trains_on_one_ray_worker_exactly_like_the_local_loop(ray_cluster, tmp_path):
    from ray_ad.distributed.filter_train import RayFilterTrainer
    from ray_ad.methods.costfilter.config import FilterTrainConfig
    from ray_ad.methods.costfilter.loss import LossWeights
    from ray_ad.methods.costfilter.network import CostFilterNet, FilterNetConfig, Matching
    from ray_ad.methods.costfilter.pool import SyntheticPool
    from ray_ad.methods.costfilter.templates import TemplateBank
    from ray_ad.methods.costfilter.training import train_filter

    generator = torch.Generator().manual_seed(2)
    masks = (torch.rand(12, 16, 16, generator=generator) > 0.8).float()
    pool = SyntheticPool(torch.rand(12, 10, 4, 4, generator=generator), masks, torch.tensor([0, 1, 2, -1] * 3),
                         base_maps=torch.rand(12, 4, 4, generator=generator),  # the filter is base-guided
                         reconstructions=torch.rand(12, 10, 4, 4, generator=generator))  # and one template each
    bank = TemplateBank(torch.rand(5, 10, 4, 4, generator=generator), [4, 6])
    matching = Matching((4, 6), templates=2, depth=6)
    config = FilterTrainConfig(steps=12, batch_size=4, loss_size=16)

    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        return CostFilterNet(6, [4, 6], FilterNetConfig(width=4, levels=2, guidance_width=2))

    local, local_losses = train_filter(net(), pool, bank, matching, config, LossWeights(), seed=5, progress=False)
    trainer = RayFilterTrainer(RayTrainSettings(workers=1, storage_path=str(tmp_path), name="cf", checkpoint_every=5))
    remote, remote_losses = trainer(net(), pool, bank, matching, config, LossWeights(), seed=5, progress=False)
    # The same run to float rounding: oneDNN's 3D convolutions may sum in another order in the worker
    # process (measured: 6e-8 apart after one step), where the score nets' 2D layers match bit for bit.
    assert len(remote_losses) == 12 and remote_losses == pytest.approx(local_losses, rel=1e-4)
    for a, b in zip(local.state_dict().values(), remote.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert trainer.last_result.metrics["step"] == 12


def test_nagl_trains_on_one_ray_worker_exactly_like_the_local_loop(ray_cluster, tmp_path):
    from ray_ad.distributed.episode_train import RayEpisodeTrainer
    from ray_ad.methods.nagl.config import EpisodeConfig, NAGLLossWeights
    from ray_ad.methods.nagl.episodes import DomainPool
    from ray_ad.methods.nagl.network import MapScoring, NAGLNet
    from ray_ad.methods.nagl.training import train_episodes

    generator = torch.Generator().manual_seed(4)
    pools = [DomainPool(name, torch.randn(6, 16, 8, generator=generator), torch.randn(5, 16, 8, generator=generator),
                        (torch.rand(5, 16, generator=generator) > 0.7).float()) for name in ("a", "b")]
    config = EpisodeConfig(steps=12, batch_size=4, lr=1e-3)

    def net() -> NAGLNet:
        torch.manual_seed(0)
        return NAGLNet(8, proxies=3, heads=2, alpha=-1e9)

    scoring = MapScoring(0.05)
    local, local_losses = train_episodes(net(), pools, config, NAGLLossWeights(), scoring, seed=5, progress=False)
    settings = RayTrainSettings(workers=1, storage_path=str(tmp_path), name="nagl", checkpoint_every=5)
    trainer = RayEpisodeTrainer(settings)
    remote, remote_losses = trainer(net(), pools, config, NAGLLossWeights(), scoring, seed=5, progress=False)
    assert len(remote_losses) == 12 and remote_losses == pytest.approx(local_losses, rel=1e-5)
    remote_state = remote.state_dict()
    for name, a in local.state_dict().items():
        b = remote_state[name]
        if name.endswith("in_proj_bias"):
            # The key bias shifts every logit of a query equally, so softmax cancels it: its gradient is
            # rounding noise, which Adam scales up to +-lr steps. Query and value biases must match.
            a, b = torch.cat([a[:8], a[16:]]), torch.cat([b[:8], b[16:]])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert trainer.last_result.metrics["step"] == 12
    assert any(p.name.startswith("checkpoint_") for p in (tmp_path / "nagl-nagl1").iterdir())
