"""EAR-Net's two stages end to end on tiny synthetic data: stage-1 hmsa run, bin/make_error_maps.py,
stage-2 ear_net training from the stage-1 run, evaluation."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retina_tf.data.io import DatasetError, read_mask, read_sample, write_image_atomic
from retina_tf.data.pipeline import (
    Augment,
    SegmentationSet,
    data_key,
    patch_dataset,
    resolve_samples,
    whole_image_dataset,
)
from retina_tf.data.synthetic import write_synthetic_dataset
from retina_tf.error_maps import (
    ERROR_MAPS_JSON,
    error_map,
    model_fingerprint,
    read_error_maps,
)
from retina_tf.errors import ConfigError
from retina_tf.evaluation import evaluate, write_error_maps
from retina_tf.flags import parse_config
from retina_tf.inference import Segmenter
from retina_tf.training import train
from tests import commands

REPO = Path(__file__).resolve().parents[1]
TINY_HMSA = ('{"width": 4, "stem_channels": 8, "num_blocks": 1, "ocr_mid_channels": 16, '
             '"ocr_key_channels": 8, "attention_channels": 8}')


def test_error_map_marks_false_positives_and_negatives_inside_the_fov():
    prob = np.array([[0.9, 0.2, 0.7], [0.1, 0.6, 0.4]])
    target = np.array([[1, 1, 0], [0, 1, 1]], bool)
    fov = np.array([[1, 1, 1], [1, 1, 0]], bool)
    expected = np.array([[0, 1, 1], [0, 0, 0]], bool)  # FN, FP; the FN at (1, 2) is outside
    np.testing.assert_array_equal(error_map(prob, target, fov), expected)


def _toy_set(seed=0, n=2, size=40):
    rng = np.random.default_rng(seed)
    images = [rng.random((size, size, 1)).astype("float32") for _ in range(n)]
    targets = [(rng.random((size, size, 1)) > 0.7).astype("float32") for _ in range(n)]
    fovs = [np.ones((size, size), bool) for _ in range(n)]
    return SegmentationSet([f"im{i}" for i in range(n)], images, targets, fovs)


def test_extra_targets_follow_the_labels_through_augmentation():
    seg = _toy_set()
    # extras equal to the labels must stay equal to them after flips and free rotations
    with_copy = seg.with_extras([t[..., 0] for t in seg.targets])
    aug = Augment(flip=True, rot90=True, rotate_degrees=20)
    x, y, w = next(iter(patch_dataset(with_copy, 16, 8, 0.5, aug, seed=1)))
    assert x.shape == (8, 16, 16, 1) and y.shape == (8, 16, 16, 2) and w.shape == (8, 16, 16, 1)
    # labels are thresholded after the free rotation, extras keep interpolated values
    np.testing.assert_array_equal(y[..., 0].numpy(), y[..., 1].numpy() > 0.5)
    assert ((y[..., 1] > 0) & (y[..., 1] < 1)).numpy().any()
    x, y, w = next(iter(whole_image_dataset(with_copy, 2, 16, aug, seed=2)))
    assert y.shape == (2, 48, 48, 2)
    np.testing.assert_array_equal(y[..., 0].numpy(), y[..., 1].numpy() > 0.5)
    rigid = Augment(flip=True, rot90=True)  # without free rotation: exactly the labels
    x, y, w = next(iter(patch_dataset(with_copy, 16, 8, 0.5, rigid, seed=3)))
    np.testing.assert_array_equal(y[..., 0].numpy(), y[..., 1].numpy())
    assert with_copy.subset([1]).extras[0].shape == (40, 40, 1)
    with pytest.raises(DatasetError, match="im0: extra target map"):
        seg.with_extras([np.zeros((8, 8)), np.zeros((40, 40))])


def test_patch_centres_ignore_the_extra_targets():
    seg = _toy_set()
    seg.targets = [np.zeros_like(t) for t in seg.targets]
    seg.targets[0][20, 20] = 1.0  # one vessel pixel; the extras are everywhere
    seg = seg.with_extras([np.ones((40, 40)), np.ones((40, 40))])
    _, y, _ = next(iter(patch_dataset(seg, 8, 16, 1.0, Augment.none(), seed=3)))
    assert (y[:, 4, 4, 0].numpy() == 1).all()  # every patch centred on the vessel pixel


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    data = write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_images=5, num_test=2,
                                   seed=4, size=(96, 96))
    logdir = tmp_path_factory.mktemp("runs")
    common = ["--dataset=synthetic", f"--data_dir={data}", f"--logdir={logdir}",
              "--patch_size=32", "--batch_size=4", "--patches_per_epoch=16", "--epochs=2",
              "--val_images=1", "--learning_rate=0.005", "--image_summary_every=0",
              f"--model_config={TINY_HMSA}"]
    run = train(parse_config("train", common + ["--model=hmsa", "--run_name=stage1"]))
    return data, logdir, run, common


@pytest.mark.slow
def test_make_error_maps_writes_the_stage1_errors(stage1):
    data, logdir, run, _ = stage1
    # no data flags: the run's own training split, as evaluate takes the run's test split
    proc = commands.script("make_error_maps.py", f"--model={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"no data given: using {run.name}'s own (--dataset=synthetic --data_dir={data}, " \
        "the training split)" in proc.stderr + proc.stdout
    samples = resolve_samples("synthetic", data, "training")
    folder = run / "error_maps"
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(s.name for s in samples)
    # each map is exactly the stage-1 model's errors inside the FOV, at the run's threshold
    seg = Segmenter.from_run(run)
    d = read_sample(samples[0])
    prob = seg.probability(d.image)[..., -1] * d.fov
    np.testing.assert_array_equal(read_mask(folder / f"{d.name}.png", what="error map"),
                                  error_map(prob, d.vessel, d.fov, seg.threshold))
    summary = json.loads((folder / "error_maps.json").read_text())
    assert summary["threshold"] == seg.threshold
    assert summary["model_sha256"] == model_fingerprint(run)  # as stage 2 will compare
    assert summary["data"] == data_key("synthetic", data, None)  # as stage 2 will compare
    assert set(summary["error_share_in_fov"]) == {s.name for s in samples}
    assert 0 <= summary["mean_error_share_in_fov"] <= 1


def test_error_maps_of_a_shipped_model_at_its_inference_scale(tmp_path):
    """make_error_maps segmented every photograph at its own size (--inference_scale ignored:
    not the errors evaluate scores) and wrote into the shipped model's own folder."""
    from retina_tf.config import ErrorMapConfig
    from retina_tf.run_folder import PRETRAINED_DIR
    data = write_synthetic_dataset(tmp_path / "small", num_images=2, size=(160, 160),
                                   num_test=1)
    shipped = PRETRAINED_DIR / "unet_drive"
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    folder = write_error_maps(ErrorMapConfig(model="unet_drive", dataset="synthetic",
                                             data_dir=str(data), logdir=str(tmp_path / "logs")))
    assert folder == tmp_path / "logs" / "unet_drive_error_maps"
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before
    seg = Segmenter.from_pretrained("unet_drive", precision="float32")
    d = read_sample(resolve_samples("synthetic", data, "training")[0])
    plan = seg.scale_plan(d.image, d.fov)
    assert plan.factor > 1.5  # a FOV far smaller than DRIVE's: enlarged
    prob = seg.probability_at_inference_scale(d.image, d.fov, plan)[..., -1] * d.fov
    np.testing.assert_array_equal(read_mask(folder / f"{d.name}.png", what="error map"),
                                  error_map(prob, d.vessel, d.fov, seg.threshold))


@pytest.mark.slow
def test_stage2_trains_from_stage1_and_evaluates(stage1, tmp_path):
    data, logdir, run, common = stage1
    if not (run / "error_maps").is_dir():  # independent of the test above
        assert commands.script("make_error_maps.py", "--dataset=synthetic", f"--data_dir={data}",
                               f"--model={run}").returncode == 0
    cfg = parse_config("train", common + ["--model=ear_net", "--run_name=stage2",
                                f"--pretrained={run.name}"])  # a run name under --logdir
    stage2 = train(cfg)
    info = json.loads((stage2 / "run.json").read_text())
    assert info["model"] == "ear_net" and info["pretrained"] == str(run)
    losses = json.loads((stage2 / "metrics.json").read_text())["loss_history"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    report = evaluate(parse_config("evaluate", common + ["--model=ear_net", "--run_name=stage2",
                                            "--visualize"]))
    assert 0.0 <= report["metrics"]["f1"] <= 1.0
    assert (stage2 / "eval_synthetic_test" / "roc_curve.png").is_file()


def test_error_maps_of_other_data_are_refused(tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    write_image_atomic(folder / "a.png", np.zeros((4, 4), bool))
    mine = data_key("drive", str(tmp_path / "DRIVE"), None)
    assert len(read_error_maps(folder, ["a"], [(4, 4)], mine)) == 1  # no record: not checked
    (folder / ERROR_MAPS_JSON).write_text(json.dumps({"data": data_key("rite", "RITE", None)}))
    with pytest.raises(DatasetError, match=r"maps: error maps of rite in .*RITE, but this run "
                                           r"trains on drive in .*DRIVE; run bin/make_error"):
        read_error_maps(folder, ["a"], [(4, 4)], mine)
    (folder / ERROR_MAPS_JSON).write_text(json.dumps({"data": mine}))
    assert len(read_error_maps(folder, ["a"], [(4, 4)], mine)) == 1
    # make_error_maps killed while it moved its maps in: part old, part new (trained on)
    from retina_tf.data.io import STAGING_PREFIX
    (folder / f"{STAGING_PREFIX}999999").mkdir()
    with pytest.raises(DatasetError, match=r"maps: an interrupted bin/make_error_maps.py left "
                                           "these maps part old, part new; run it again"):
        read_error_maps(folder, ["a"], [(4, 4)], mine)


def test_error_maps_of_another_stage1_model_are_refused(tmp_path):
    # stage 2 learns where its stage 1 errs: another model's maps would teach it nothing true
    runs = {name: tmp_path / name for name in ("stage1", "other")}
    for name, run in runs.items():
        run.mkdir()
        (run / "model.keras").write_bytes(name.encode())
    folder = tmp_path / "maps"
    folder.mkdir()
    write_image_atomic(folder / "a.png", np.zeros((4, 4), bool))
    record = {"run": str(runs["stage1"]), "model_sha256": model_fingerprint(runs["stage1"])}
    (folder / ERROR_MAPS_JSON).write_text(json.dumps(record))
    assert len(read_error_maps(folder, ["a"], [(4, 4)], stage1=runs["stage1"])) == 1
    with pytest.raises(DatasetError, match=r"maps: error maps of .*stage1's model, not of the "
                                           r"stage-1 run .*other as it is now; run bin/make_"
                                           r"error_maps.py --model=.*other"):
        read_error_maps(folder, ["a"], [(4, 4)], stage1=runs["other"])
    (runs["stage1"] / "model.keras").write_bytes(b"trained again")  # --overwrite
    with pytest.raises(DatasetError, match="stage1 as it is now"):
        read_error_maps(folder, ["a"], [(4, 4)], stage1=runs["stage1"])
    # maps that record no fingerprint: by the run's folder
    (folder / ERROR_MAPS_JSON).write_text(json.dumps({"run": str(runs["stage1"])}))
    assert len(read_error_maps(folder, ["a"], [(4, 4)], stage1=runs["stage1"])) == 1
    with pytest.raises(DatasetError, match="not of the stage-1 run"):
        read_error_maps(folder, ["a"], [(4, 4)], stage1=runs["other"])


def test_error_maps_without_the_stage1_weights_are_warned_of(tmp_path, caplog):
    from retina_tf.training import attach_error_maps
    toy = _toy_set()
    for name in toy.names:
        write_image_atomic(tmp_path / f"{name}.png", np.zeros((40, 40), bool))
    with_maps = attach_error_maps(toy, str(tmp_path), None, "ear_net")
    assert len(with_maps.extras) == 2
    assert "--error_maps without --pretrained: ear_net starts from random weights" in caplog.text


@pytest.mark.slow
def test_make_error_maps_keeps_the_users_files_and_writes_nothing_on_a_bad_image(stage1,
                                                                               tmp_path):
    data, _, run, _ = stage1
    out = tmp_path / "maps"
    out.mkdir()
    (out / "03_training.png").write_bytes(b"the user's")

    def make(data_dir, *extra):
        return write_error_maps(parse_config("make_error_maps", [
            "--dataset=synthetic", f"--data_dir={data_dir}", f"--model={run}",
            f"--output_dir={out}", *extra]))

    with pytest.raises(ConfigError, match="03_training.png already exists and was not written"):
        make(data)
    assert (out / "03_training.png").read_bytes() == b"the user's"
    make(data, "--overwrite")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "training" / "images" / "05_training.tif").write_bytes(b"not a tiff")
    with pytest.raises(DatasetError, match="05_training.tif"):
        make(broken)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the maps made before


@pytest.mark.slow
def test_stage2_without_error_maps_says_what_to_run(stage1, tmp_path):
    _, _, run, common = stage1
    with pytest.raises(ValueError, match="--pretrained=<stage-1 run>"):
        train(parse_config("train", common + ["--model=ear_net", f"--logdir={tmp_path}"]))
    with pytest.raises(DatasetError, match="make_error_maps"):
        read_error_maps(tmp_path / "nowhere", ["a"], [(4, 4)])
    (tmp_path / "maps").mkdir()
    with pytest.raises(DatasetError, match=r"a\.png: missing error map"):
        read_error_maps(tmp_path / "maps", ["a"], [(4, 4)])
