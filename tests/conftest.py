"""Shared fixtures: tiny generated datasets, the real magnetic_tile data when present, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = REPO.parent / "shared" / "datasets" / "magnetic_tile"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A striped texture with noise: the 'normal' product surface."""
    y, x = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi)
    base = 128 + 40 * np.sin(x / 3.0 + phase) + rng.normal(0, 6, (size, size))
    return base.clip(0, 255).astype(np.uint8)


def make_mvtec(root: Path, n_train: int = 12, n_good: int = 4, n_bad: int = 4, size: int = 64, seed: int = 0) -> Path:
    """A tiny MVTec-layout dataset: striped textures; defects are bright squares with masks."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_good)):
        folder = root / split / "good"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(texture(rng, size)).save(folder / f"{i:03d}.png")
    (root / "test" / "spot").mkdir(parents=True, exist_ok=True)
    (root / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
    for i in range(n_bad):
        image = texture(rng, size)
        mask = np.zeros((size, size), dtype=np.uint8)
        y, x = rng.integers(8, size - 24, 2)
        image[y : y + 16, x : x + 16] = 250
        mask[y : y + 16, x : x + 16] = 255
        Image.fromarray(image).save(root / "test" / "spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    return make_mvtec(tmp_path / "tiny")


@pytest.fixture
def magnetic_tile() -> Path:
    if not MAGNETIC_TILE.exists():
        pytest.skip(f"real dataset not present at {MAGNETIC_TILE} (only in the repo's shared/ checkout)")
    return MAGNETIC_TILE


def tiny_osd_irf_config(**extra: object) -> dict:
    """An OSD-IRF config small enough to train in seconds on a CPU (real embedded backbone weights)."""
    config = {
        "backbone": {"image_size": 64, "grid_size": 8, "layers": [1, 2]},
        "score_net": {"hidden": 48, "depth": 1, "heads": 2},
        "train": {"steps": 150, "batch_size": 8, "warmup_steps": 5, "lr": 1e-3, "ema_decay": 0.9},
        "t": 250,
        "map_sigma": 1.0,
        "device": "cpu",
    }
    config.update(extra)
    return config


def tiny_nagl_config(**extra: object) -> dict:
    """A NAGL config (4 heads over the 64 channels of lite0 stages 1-2) that trains in seconds on a CPU."""
    config = {
        "backbone": {"image_size": 64, "grid_size": 8, "layers": [1, 2]},
        "proxies": 5, "heads": 4, "map_sigma": 1.0, "device": "cpu",
        "train": {"steps": 60, "batch_size": 4, "lr": 3e-3, "synthetic_count": 12, "max_normals": 12},
    }
    config.update(extra)
    return config


def tiny_costfilter_config(**extra: object) -> dict:
    """A CostFilter-AD config (a patchcore base, a small filter) that trains in seconds on a CPU."""
    backbone = {"image_size": 64, "grid_size": 8, "layers": [1, 2]}
    config = {
        "backbone": backbone, "base": {"method": "patchcore", "config": {"backbone": backbone}},
        "templates": 2, "matching_depth": 8, "template_bank": 8,
        "filter": {"width": 8, "levels": 2, "guidance_width": 4},
        "train": {"steps": 30, "batch_size": 4, "pool_size": 24, "loss_size": 32},
        "score_top_pixels": 20, "map_sigma": 1.0, "device": "cpu",
    }
    config.update(extra)
    return config


def tiny_ref_cfa_config(**extra: object) -> dict:
    config = {
        "backbone": {"image_size": 64, "grid_size": 8, "layers": [1, 2]},
        "score_net": {"hidden": 48, "depth": 1, "heads": 2},
        "train": {"steps": 60, "batch_size": 8, "warmup_steps": 5, "lr": 1e-3, "ema_decay": 0.9},
        "fields": {"timesteps": [300, 200, 100], "token_dim": 4},
        "head": {"steps": 60, "batch_images": 4, "d_model": 16, "heads": 2, "embed_dim": 4, "hidden": 16},
        "cfa": {"rank": 3},
        "map_sigma": 1.0,
        "device": "cpu",
    }
    config.update(extra)
    return config


def shift_folder(source: Path, target: Path) -> Path:
    """The same layout with every image darker and lower in contrast (a 'new camera'); masks copied."""
    for path in source.rglob("*.png"):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(path)
        if "ground_truth" not in path.parts:
            array = np.asarray(image, dtype=np.float32)
            image = Image.fromarray((0.6 * array + 20).clip(0, 255).astype(np.uint8))
        image.save(out)
    return target


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol endpoint on 127.0.0.1 (moto's ThreadedMotoServer, as s3fs's own tests use)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the loopback S3 endpoint; ray_ad.storage is pointed at it."""
    import uuid

    import s3fs

    from ray_ad import storage

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    storage.configure_s3()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_server, use_listings_cache=False).mkdir(bucket)
    yield f"s3://{bucket}"
    storage.configure_s3()


def upload_folder(local: Path, uri: str) -> None:
    from ray_ad import storage

    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes())


TEST_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray cluster (2 CPUs) whose workers reach the loopback S3 endpoint."""
    ray = pytest.importorskip("ray")
    # Export application metrics every second (default 10 s) so the metrics test does not wait long;
    # give Serve's HTTP proxy 30 s (default 5 s) to come up on a loaded 2-core CI machine; run Serve with
    # the throughput flags the README and the walkthrough use (gRPC between its processes).
    ray_env = {"RAY_metrics_report_interval_ms": "1000", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
               "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    saved = {k: os.environ.get(k) for k in [*TEST_S3_ENV, "AWS_ENDPOINT_URL_S3", *ray_env]}
    os.environ.update(TEST_S3_ENV, AWS_ENDPOINT_URL_S3=s3_server, **ray_env)
    from ray_ad.distributed.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def batch_dependence(detector, images: torch.Tensor, sizes: tuple[int, ...] = (2, 4, 16)) -> float:
    """Largest |score alone - score inside a batch| over the first ``max(sizes)`` images: a client's
    score must not depend on which other requests the service batched its image with."""
    alone = torch.cat([detector.predict(images[i : i + 1]).pred_score for i in range(max(sizes))])
    return max(float((detector.predict(images[:size]).pred_score - alone[:size]).abs().max()) for size in sizes)


def image_batch(folder: Path, detector, count: int = 16) -> torch.Tensor:  # noqa: ANN001 - any Detector
    """``count`` images of a generated dataset (cycled when it holds fewer), as ``detector`` preprocesses them."""
    from ray_ad.data.images import load_image

    paths = sorted(folder.rglob("*.png"))
    paths = [p for p in paths if "ground_truth" not in p.parts]
    return detector.preprocessor.batch([load_image(str(paths[i % len(paths)])) for i in range(count)])


def wait_for_serve_gone(seconds: float = 90) -> None:
    """Before ``serve.start``: an earlier module's ``serve.shutdown()`` can return while its controller
    is still being killed (it did not stop within Serve's 30 s on a loaded machine); a new start would
    then reach that dying controller."""
    import time

    import ray

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        except ValueError:
            return
        time.sleep(1)
    raise TimeoutError(f"Serve's controller from an earlier test module is still alive after {seconds} s")


# What makes a test "slow" (deselect with `pytest -m "not slow"`): it lives under tests/integration,
# or it starts Ray, Serve or an S3 server, or reads the real datasets (these fixtures), or it trains a
# real model (marked by hand with @pytest.mark.slow).
SLOW_FIXTURES = {"ray_cluster", "s3_server", "s3_bucket", "magnetic_tile"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if ("integration" in item.path.parts or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or "s3" in params.values()):  # the same test against the S3 server
            item.add_marker(pytest.mark.slow)
