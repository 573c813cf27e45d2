import json

import pytest
import yaml

from ray_ad.cli import main
from tests.helpers import pairwise_auroc

KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
        "seconds_per_image")


@pytest.fixture
def tiny_config(tmp_path):
    from tests.conftest import tiny_osd_irf_config

    config = tiny_osd_irf_config(train={"steps": 10, "batch_size": 4, "warmup_steps": 2})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow  # trains a detector
def test_train_evaluate_predict_end_to_end(tiny_mvtec, tiny_config, tmp_path, capsys):
    model = str(tmp_path / "model")
    assert main(["train", "--method", "osd_irf", "--data", str(tiny_mvtec), "--out", model,
                 "--config", tiny_config, "--set", "t=300", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "image_auroc" in out and f"saved osd_irf bundle to {model}" in out
    assert json.loads((tmp_path / "model" / "config.json").read_text())["config"]["t"] == 300

    report = tmp_path / "metrics.json"
    heatmaps = tmp_path / "heat"
    assert main(["evaluate", "--model", model, "--data", str(tiny_mvtec), "--json", str(report),
                 "--heatmaps", str(heatmaps), "--quiet"]) == 0
    metrics = json.loads(report.read_text())
    assert all(isinstance(metrics[k], float) for k in KEYS)
    assert metrics["seconds_per_image"] > 0
    assert len(list(heatmaps.glob("*.png"))) == 8
    # evaluate's AUROC is the pair count over what predict says of the same 8 images, labelled by folder.
    images = sorted(str(p) for p in (tiny_mvtec / "test").rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", "--model", model, *images, "--json"]) == 0
    scores = {row["path"]: row["score"] for row in json.loads(capsys.readouterr().out)}
    assert metrics["image_auroc"] == pytest.approx(pairwise_auroc(scores, {p for p in images if "/spot/" in p}))

    assert main(["evaluate", "--model", model, "--data", str(tiny_mvtec), "--scoring", "inversion",
                 "--quiet"]) == 0

    image = tiny_mvtec / "test" / "spot" / "000.png"
    capsys.readouterr()
    assert main(["predict", "--model", model, str(image), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["path"] == str(image) and isinstance(row["is_anomaly"], bool)
    assert row["is_anomaly"] == (row["score"] > row["threshold"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--method", "osd_irf", "--data", "{missing}", "--out", "{out}"], "dataset folder not found"),
        (["train", "--method", "osd_irf", "--data", "{data}", "--out", "{out}", "--set", "train.stepz=3"],
         "unknown config key 'train.stepz'"),
        (["train", "--method", "osd_irf", "--data", "{data}", "--out", "{out}", "--set", "t"], "key=value"),
        (["train", "--method", "osd_irf", "--data", "elpv:cdte", "--out", "{out}"], "unknown elpv domain"),
        (["train", "--method", "osd_irf", "--data", "{data}", "--out", "{out}", "--config", "{missing}"],
         "file not found"),
        (["evaluate", "--model", "{missing}", "--data", "{data}"], "no model bundle at"),
        (["predict", "--model", "{missing}", "{data}/train/good/000.png"], "no model bundle at"),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_code_2(argv, message, tiny_mvtec, tmp_path, capsys):
    values = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out"), "data": str(tiny_mvtec)}
    assert main([arg.format(**values) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.slow  # trains a detector
def test_predict_reports_unreadable_images_and_exits_1(tiny_mvtec, tiny_config, tmp_path, capsys):
    model = str(tmp_path / "model")
    main(["train", "--method", "osd_irf", "--data", str(tiny_mvtec), "--out", model, "--config", tiny_config,
          "--no-eval", "--quiet"])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    good = tiny_mvtec / "train" / "good" / "001.png"
    capsys.readouterr()
    assert main(["predict", "--model", model, str(junk), str(good)]) == 1
    captured = capsys.readouterr()
    assert "junk.png: not a readable image" in captured.err
    assert str(good) in captured.out


def test_unknown_method_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--method", "magic", "--data", "x", "--out", "y"])
    assert info.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_abnormal_references_split_at_the_one_colon_that_is_not_a_scheme():
    from ray_ad.cli import split_image_mask
    from ray_ad.errors import ConfigError

    assert split_image_mask("a.png:m.png") == ("a.png", "m.png")
    assert split_image_mask("s3://b/a.png:s3://b/m.png") == ("s3://b/a.png", "s3://b/m.png")
    for bad in ("a.png", "a.png:", "a:b:c"):
        with pytest.raises(ConfigError, match="IMAGE:MASK"):
            split_image_mask(bad)


@pytest.mark.slow  # trains a small NAGL generalist
def test_nagl_trains_on_two_domains_evaluates_by_draws_and_takes_a_line_s_references(tmp_path, capsys):
    from tests.conftest import make_mvtec, tiny_nagl_config

    first, second = make_mvtec(tmp_path / "first", seed=0), make_mvtec(tmp_path / "second", seed=1)
    config = tmp_path / "nagl.yaml"
    config.write_text(yaml.safe_dump(tiny_nagl_config(train={"steps": 10, "batch_size": 4, "synthetic_count": 4,
                                                              "max_normals": 6})))
    model = str(tmp_path / "generalist")
    assert main(["train", "--method", "nagl", "--data", str(first), "--data", str(second), "--out", model,
                 "--config", str(config), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", model, "--data", str(second), "--quiet"]) == 2
    assert "--shots" in capsys.readouterr().err

    report = tmp_path / "draws.json"
    assert main(["evaluate", "--model", model, "--data", str(second), "--shots", "2+1", "--draws", "2",
                 "--json", str(report), "--quiet"]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["shots"] == "2+1" and len(metrics["draws"]) == 2
    # Two draws score different images (each draw's references are left out): the mean is theirs.
    assert metrics["image_auroc"] == pytest.approx(sum(d["image_auroc"] for d in metrics["draws"]) / 2)
    assert "image_auroc_std" in metrics and "pixel_auroc" in metrics

    good, spot, masks = second / "train" / "good", second / "test" / "spot", second / "ground_truth" / "spot"
    root = tmp_path / "root"
    assert main(["references", "add", "--model", model, "--normal", str(good / "000.png"), str(good / "001.png"),
                 "--abnormal", f"{spot / '000.png'}:{masks / '000_mask.png'}", "--root", str(root),
                 "--line", "new-line"]) == 0
    assert "published 2+1 references as new-line" in capsys.readouterr().out
    from ray_ad import registry

    detector, _ = registry.load_current(str(root), "new-line")
    assert detector.references is not None and detector.references.shots == "2+1"
    served = root / "models" / "new-line" / registry.current_version(str(root), "new-line")
    assert main(["predict", "--model", str(served), str(spot / "001.png")]) == 0
    # A mask missing from an abnormal reference: refused, nothing published.
    assert main(["references", "add", "--model", model, "--normal", str(good / "000.png"),
                 "--abnormal", str(spot / "000.png"), "--root", str(root), "--line", "other"]) == 2
    assert registry.list_versions(str(root), "other") == []


def test_procedural_domains_are_written_once_and_train_a_nagl_generalist(tmp_path, capsys):
    from tests.conftest import tiny_nagl_config

    out = str(tmp_path / "domains")
    assert main(["procedural", "--out", out, "--domains", "2", "--normals", "6", "--defects", "3",
                 "--size", "64"]) == 0
    uris = capsys.readouterr().out.split()
    assert [uri.rsplit("/", 1)[-1] for uri in uris] == ["procedural-00-perlin", "procedural-01-stripes"]
    config = tmp_path / "nagl.yaml"
    config.write_text(yaml.safe_dump(tiny_nagl_config(train={"steps": 2, "batch_size": 2, "synthetic_count": 2,
                                                              "max_normals": 4})))
    model = str(tmp_path / "generalist")
    assert main(["train", "--method", "nagl", *[arg for uri in uris for arg in ("--data", uri)], "--out", model,
                 "--config", str(config), "--quiet", "--no-eval"]) == 0
    assert json.loads((tmp_path / "generalist" / "metrics.json").read_text())["fit"]["domains"] == [
        "procedural-00-perlin", "procedural-01-stripes"]
    assert main(["procedural", "--out", out, "--domains", "0"]) == 2
    assert "count >= 1" in capsys.readouterr().err
