"""What an answer tells a microscopist besides the masks: the size in their terms (a diameter in, the factor
applied and the diameter assumed out), warnings when the input is not what the model knows, and per-object
measurements equal to scikit-image's regionprops on the full-frame masks and the raw image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils
from skimage.measure import regionprops

from inference.errors import UnusableInput
from inference.pipeline import Pass, SegmentOptions
from inference.predictor import Predictor, in_process_options
from inference.scale import MAX_SELF_DISAGREEMENT, choose_estimate, probe_evidence
from model.checkpoint import load_checkpoint, save_checkpoint
from model.input_contract import InputContract
from tests.service_models import tiny_checkpoint
from training.nucleus import HELA_IMAGES, resource

MICROSCOPY = ("data.resize=scale", "data.scale_test=1.5", "data.intensity=percentile")
OBJECT_SIZE = 36.0  # input pixels at the model's own scale 1.5: objects 24 image pixels across
PHOTO = Path(
    "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/JPEGImages/2011_000003.jpg"
)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """A tiny microscopy EmbedMask with confident detections that records its training objects' size."""
    workdir = tmp_path_factory.mktemp("answers")
    path = tiny_checkpoint("embedmask", workdir / "nuclei.pt", extra=MICROSCOPY, object_size=OBJECT_SIZE)
    saved = load_checkpoint(path)
    saved["model"]["head.cls_logits.bias"] += 3.0
    saved["object_density"] = 50.0
    save_checkpoint(saved, path)
    return Predictor.open(path, in_process_options(engine="onnxruntime"), cache_dir=workdir)


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    """A crop of a raw HeLa frame (uint16 on an offset, as the microscope wrote it)."""
    return tifffile.imread(resource(HELA_IMAGES), key=0)[100:228, 300:428]


def tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def test_a_diameter_sets_the_scale_and_the_answer_says_what_it_applied(predictor: Predictor, field: np.ndarray) -> None:
    """Objects 12 px across are half the trained 24 px: scale 2 on top of the model's own 1.5 (a resize of 3x);
    without a diameter, the model's own size assumes 24 px; a scale of 2 assumes 12 px."""
    data = tiff(field)
    assert predictor.pipeline.expected_diameter == pytest.approx(24.0)
    asked = predictor(data, SegmentOptions(diameter=12.0))
    assert (asked.scale, asked.resize_factor, asked.diameter) == (
        pytest.approx(2.0),
        pytest.approx(3.0),
        pytest.approx(12.0),
    )
    own = predictor(data, SegmentOptions(scale=1.0))
    assert (own.scale, own.resize_factor, own.diameter) == (1.0, pytest.approx(1.5), pytest.approx(24.0))
    default = predictor(data)  # a model that records its objects' size estimates the scale when asked for none
    assert (
        predictor.pipeline.default_scale == "auto"
        and default.scale == predictor(data, SegmentOptions(scale="auto")).scale
    )
    assert predictor(data, SegmentOptions(scale=2.0)).diameter == pytest.approx(12.0)
    with pytest.raises(UnusableInput, match="not both"):
        predictor(data, SegmentOptions(scale=1.0, diameter=12.0))
    huge = predictor(data, SegmentOptions(diameter=1000.0))  # asks for 0.024: clamped to 0.1, and said so
    assert huge.scale == pytest.approx(0.1) and any("outside" in w for w in huge.warnings)


def test_warnings_name_what_the_model_does_not_know(predictor: Predictor, field: np.ndarray) -> None:
    """A colour photo sent to a grey microscopy model is flagged, a grey image saved as RGB is not; an answer
    far denser than the training images (recorded: 50 objects per input megapixel) is flagged."""
    photo = predictor(PHOTO.read_bytes(), SegmentOptions(score_threshold=0.0))
    assert any("colour" in w for w in photo.warnings)
    grey = np.asarray(Image.open(PHOTO).convert("L").convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    assert not any("colour" in w for w in predictor(buffer.getvalue()).warnings)
    crowded = predictor(tiff(field), SegmentOptions(score_threshold=0.0))
    input_megapixels = field.size * 1.5**2 / 1e6
    assert len(crowded.instances) / input_megapixels > 3 * 50.0  # the tiny model finds many small objects
    assert any("density" in w for w in crowded.warnings)
    assert not any("density" in w for w in predictor(tiff(field), SegmentOptions(score_threshold=0.99)).warnings)


def test_measurements_equal_regionprops_on_full_frame_masks_and_raw_values(
    predictor: Predictor, field: np.ndarray
) -> None:
    answer = predictor(tiff(field), SegmentOptions(score_threshold=0.0, measure=True))
    assert answer.measurements is not None and len(answer.measurements) == len(answer.instances) > 5
    for instance, measured in zip(answer.instances, answer.measurements):
        assert instance.rle is not None and measured is not None
        mask = mask_utils.decode({**instance.rle, "counts": instance.rle["counts"].encode()})
        (reference,) = regionprops(mask, intensity_image=field)
        assert measured.area == reference.area == instance.area
        assert (measured.centroid_y, measured.centroid_x) == pytest.approx(reference.centroid, abs=1e-9)
        assert measured.perimeter == pytest.approx(reference.perimeter, abs=1e-9)
        assert measured.eccentricity == pytest.approx(reference.eccentricity, abs=1e-9)
        assert measured.mean_intensity == pytest.approx(reference.intensity_mean, rel=1e-9)
        assert measured.max_intensity == reference.intensity_max and measured.max_intensity > 255  # raw counts
    with pytest.raises(UnusableInput, match="need masks"):
        predictor(tiff(field), SegmentOptions(measure=True, mask_format="none"))


def test_auto_keeps_the_model_scale_near_the_training_size_and_its_probe_is_the_answer(
    tmp_path: Path, field: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that records its training objects 10% larger than this field's: scale=auto snaps to the model's
    own scale and answers with its own-scale probe (no answering pass), exactly as scale=1 does; one that
    records them half as large runs an answering pass at about half the scale. (The tiny random model's boxes
    have one size at every scale, so only the own-scale probe runs here; choosing among probes is tested on
    evidence below.)"""
    monkeypatch.setattr("inference.pipeline.AUTO_PROBE_SCALES", (1.0,))
    path = tiny_checkpoint("embedmask", tmp_path / "nuclei.pt", extra=MICROSCOPY, object_size=1.0)
    saved = load_checkpoint(path)
    saved["model"]["head.cls_logits.bias"] += 3.0
    save_checkpoint(saved, path)
    measuring = Predictor.open(path, in_process_options(engine="onnxruntime"), cache_dir=tmp_path)
    boxes = np.array([i.box for i in measuring(tiff(field), SegmentOptions(score_threshold=0.3, scale=1.0)).instances])
    median_side = float(np.median(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))))
    saved["object_size"] = 1.1 * median_side * 1.5  # input pixels at the model's own scale, 1.5
    save_checkpoint(saved, path)
    predictor = Predictor.open(path, in_process_options(engine="onnxruntime"), cache_dir=tmp_path)

    auto = predictor(tiff(field), SegmentOptions(scale="auto", measure=True))
    fixed = predictor(tiff(field), SegmentOptions(scale=1.0, measure=True))
    assert auto.answered_by_probe and auto.scale == 1.0 and auto.instances
    assert auto.instances == fixed.instances and auto.measurements == fixed.measurements
    saved["object_size"] = 0.5 * median_side * 1.5
    save_checkpoint(saved, path)
    halving = Predictor.open(path, in_process_options(engine="onnxruntime"), cache_dir=tmp_path)
    half = halving(tiff(field), SegmentOptions(scale="auto"))
    assert not half.answered_by_probe and 0.4 < half.scale < 0.6


def test_the_believed_probe_is_the_one_whose_objects_look_like_the_training_objects() -> None:
    """Nuclei three times the training size: the own-scale probe sees a few confident fragments of training size
    in a large region (little support per input pixel), the probe at a third sees the nuclei, training-sized
    there, densely; the second is believed and its estimate (about a third) used. Probes that measured nothing
    never win; none measuring gives no estimate."""
    contract = InputContract(
        size_divisibility=32, min_size=128, max_size=192, pad_value=[0, 0, 0], resize="scale", scale=2.0,
        intensity="percentile", object_size=48.0,
    )  # fmt: skip
    fragments = np.array([[10, 10, 34, 34], [100, 40, 124, 64], [200, 80, 224, 104]], np.float32)  # 24 px: 48 input px
    nuclei = np.array([[x, y, x + 72, y + 72] for x in (0, 80, 160) for y in (0, 80)], np.float32)  # 72 px at 2/3
    own = probe_evidence(contract, fragments, np.full(3, 0.4), (256, 256), 1.0)
    third = probe_evidence(contract, nuclei, np.full(6, 0.9), (160, 240), 1 / 3)
    nothing = probe_evidence(contract, np.zeros((0, 4), np.float32), np.zeros(0), (64, 64), 3.0)
    assert own.estimate is not None and own.estimate.scale == pytest.approx(1.0)
    assert third.estimate is not None and third.estimate.scale == pytest.approx(1 / 3)
    assert third.support > own.support > nothing.support == 0.0
    assert choose_estimate([own, third, nothing]) == third
    assert choose_estimate([nothing]) is None


def test_a_probe_that_measures_a_change_from_its_own_scale_is_not_believed_for_its_support() -> None:
    """Training-sized nuclei: the own-scale probe finds them and measures no change; the probe at a third finds
    objects, confidently and densely per input pixel (more support), but measures them as needing twice its
    own scale. The own-scale probe agrees with itself and is believed."""
    contract = InputContract(
        size_divisibility=32, min_size=128, max_size=192, pad_value=[0, 0, 0], resize="scale", scale=2.0,
        intensity="percentile", object_size=48.0,
    )  # fmt: skip
    nuclei = np.array([[x, y, x + 24, y + 24] for x in (0, 60, 120) for y in (0, 60)], np.float32)  # 48 input px
    blobs = np.array([[x, y, x + 36, y + 36] for x in (0, 60, 120) for y in (0, 60)], np.float32)  # 24 at 2/3
    own = probe_evidence(contract, nuclei, np.full(6, 0.8), (256, 256), 1.0)
    third = probe_evidence(contract, blobs, np.full(6, 0.9), (256, 256), 1 / 3)
    assert own.estimate is not None and own.estimate.scale == pytest.approx(1.0)
    assert third.estimate is not None and third.estimate.scale == pytest.approx(2 / 3)  # twice its probe's
    assert third.support > own.support
    assert choose_estimate([third, own]) == own
    # Alone, the probe at a third (its estimate twice its scale) is still believed; one whose estimate is more than
    # MAX_SELF_DISAGREEMENT from its scale is not: no estimate, the model's own scale.
    assert choose_estimate([third]) == third
    far = probe_evidence(contract, blobs, np.full(6, 0.9), (256, 256), 0.25)
    assert far.estimate is not None and far.estimate.scale / far.scale > MAX_SELF_DISAGREEMENT
    assert choose_estimate([far]) is None


def test_a_full_graph_output_warns_only_when_the_cap_cut_answerable_detections() -> None:
    """The graph returned its maximum of 3: that may have cut objects only when its lowest-scoring one still
    passes the answer's threshold; a maximum filled with detections below it cut nothing the answer would hold."""
    step = Pass(
        scale=1.0, image_size=(64, 64), bucket=(64, 64), inputs=[], plan=None,
        finishing={"score_threshold": 0.3}, limit=None, max_detections=3,
    )  # fmt: skip
    assert step.saturated({"num_dets": np.array(3), "scores": np.array([0.9, 0.8, 0.5])})
    assert not step.saturated({"num_dets": np.array(3), "scores": np.array([0.9, 0.8, 0.1])})
    assert not step.saturated({"num_dets": np.array(2), "scores": np.array([0.9, 0.8, 0.0])})
