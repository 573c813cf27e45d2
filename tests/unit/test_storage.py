import pytest

from ray_ad import storage
from ray_ad.errors import DataError


def test_local_write_is_atomic_and_readable(tmp_path):
    target = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(target, b"hello")
    assert storage.read_bytes(target) == b"hello"
    storage.write_bytes(target, b"again")
    assert storage.read_bytes(target) == b"again"
    # No temporary siblings are left behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]


def test_missing_file_names_the_uri(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.png"):
        storage.read_bytes(str(tmp_path / "nope.png"))


def test_s3_round_trip_and_listing(s3_bucket):
    storage.write_text(storage.join(s3_bucket, "x", "one.txt"), "1")
    storage.write_text(storage.join(s3_bucket, "x", "y", "two.txt"), "2")
    assert storage.read_text(f"{s3_bucket}/x/one.txt") == "1"
    assert storage.list_files(f"{s3_bucket}/x") == [f"{s3_bucket}/x/one.txt", f"{s3_bucket}/x/y/two.txt"]
    with pytest.raises(DataError, match="file not found"):
        storage.read_bytes(f"{s3_bucket}/x/missing.txt")


def test_endpoint_comes_from_the_standard_environment_variable(s3_bucket, s3_server):
    assert storage.s3_options()["endpoint_url"] == s3_server
