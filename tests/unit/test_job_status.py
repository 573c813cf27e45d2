"""Adaptation job status objects: one module writes and reads them."""

from __future__ import annotations

import json

import pytest

from ray_ad.errors import DataError
from ray_ad.job_status import (
    LANDING_MANIFEST,
    adapt_job_id,
    job_status_uri,
    landing_manifest,
    read_job_status,
    target_key,
    write_job_status,
)


def test_a_written_status_reads_back_with_its_update_time(tmp_path):
    root = str(tmp_path)
    job_id = adapt_job_id("poly", "mono", "v1", target_key("elpv:poly"))
    assert read_job_status(root, job_id) is None
    write_job_status(root, {"job_id": job_id, "state": "running"})
    status = read_job_status(root, job_id)
    assert status["state"] == "running" and status["updated"].endswith("+00:00")
    (tmp_path / "jobs" / f"{job_id}.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_job_status(root, job_id)
    assert job_status_uri(root, job_id).endswith(f"jobs/{job_id}.json")


def test_a_landed_batch_is_keyed_by_its_digest_and_a_dataset_by_its_uri(tmp_path):
    batch = tmp_path / "b1"
    batch.mkdir()
    (batch / LANDING_MANIFEST).write_text(json.dumps({"images": [], "digest": "abc"}))
    assert target_key(str(batch)) == "sha256:abc"
    assert landing_manifest("elpv:poly") is None and target_key("elpv:poly") == "elpv:poly"
    assert landing_manifest(str(tmp_path / "m.parquet")) is None
