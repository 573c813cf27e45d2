from ray_ad.devices import pick_device
from ray_ad.report import format_table


def test_a_table_has_a_row_per_run_and_a_dash_for_a_missing_metric():
    table = format_table({"patchcore": {"image_auroc": 0.91234}, "osd_irf": {}}, ("image_auroc", "pixel_auroc"))
    header, first, second = table.splitlines()
    assert header.split() == ["image_auroc", "pixel_auroc"]
    assert first.split() == ["patchcore", "0.9123", "-"] and second.split() == ["osd_irf", "-", "-"]


def test_auto_device_is_cuda_only_when_available():
    import torch

    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
