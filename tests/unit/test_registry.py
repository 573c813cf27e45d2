import pytest

from ray_ad import registry, storage
from ray_ad.bundle import WEIGHTS_FILE
from ray_ad.errors import BundleError, ConfigError
from tests.helpers import random_bank_patchcore


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_publish_points_current_at_the_newest_complete_version_and_rolls_back(root):
    assert registry.current_version(root, "line-a") is None
    first = registry.publish(random_bank_patchcore(1), root, "line-a", {"image_auroc": 0.9})
    second = registry.publish(random_bank_patchcore(2), root, "line-a")
    assert registry.current_version(root, "line-a") == second
    assert registry.list_versions(root, "line-a") == sorted([first, second])
    assert registry.list_lines(root) == ["line-a"]
    detector, version = registry.load_current(root, "line-a")
    assert version == second and detector.threshold == 2.0
    registry.set_current(root, "line-a", first)  # rollback = rewrite the pointer
    assert registry.load_current(root, "line-a")[0].threshold == 1.0


def test_a_broken_version_is_never_made_current(root):
    good = registry.publish(random_bank_patchcore(1), root, "line-b")
    bad = registry.publish(random_bank_patchcore(2), root, "line-b")
    registry.set_current(root, "line-b", good)
    weights = storage.join(registry.version_uri(root, "line-b", bad), WEIGHTS_FILE)
    storage.write_bytes(weights, storage.read_bytes(weights)[:100])  # truncated after publishing
    with pytest.raises(BundleError, match="truncated"):
        registry.set_current(root, "line-b", bad)
    with pytest.raises(BundleError, match="no model bundle"):
        registry.set_current(root, "line-b", "v-missing")
    with pytest.raises(BundleError, match="never overwritten"):
        registry.publish(random_bank_patchcore(3), root, "line-b", version=good)
    assert registry.current_version(root, "line-b") == good
    assert registry.load_current(root, "line-b")[0].threshold == 1.0


@pytest.mark.parametrize("line", ["Line", "../etc", "", "a/b", "x" * 64, "line-a\n", "line-a\r\n"])
def test_bad_line_names_are_refused(tmp_path, line):
    with pytest.raises(ConfigError, match="line"):
        registry.publish(random_bank_patchcore(1), str(tmp_path), line)
