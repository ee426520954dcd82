"""The one image -> instances pipeline of a model, written once for every entry point.

The steps, each a named function or method: ``decode`` (file bytes -> 8-bit RGB by the model's intensity
rule, ``inference.decode``) -> ``steps`` (the control flow: for ``scale=auto`` a probe pass and the scale
estimate, ``inference.scale``; then the answering pass, unless the probe answers) -> ``plan`` (one pass: resize by the
model's size rule times the scale into a shape bucket, or cut into tiles, ``inference.sizing`` and
``inference.tiling``) -> the runtime (not here) -> ``Pass.finish`` (paste, threshold, RLE per input,
``model.finishing``) -> ``Pass.collect`` (tiles merged).

``steps`` is a generator: it yields each ``Pass`` to run and receives its ``PassResult``, so one control flow
serves two drivers: ``run_sync`` here (the ``Predictor``: evaluation, the predict CLI, the benchmarks) and
the service's asynchronous batcher (``service.worker``), which runs the inputs of many requests' passes in
shared batches. Neither driver knows about scales, tiles or finishing; both run a pass's inputs and hand
each input's outputs to ``Pass.finish``.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from export.metadata import GraphMetadata
from inference.decode import DEFAULT_MAX_IMAGE_PIXELS, configure_pil, decode_image
from inference.errors import UnusableInput
from inference.hints import capacity_hints, colour_hints, density_hints
from inference.measure import Measurement, measure
from inference.scale import (
    AUTO_MIN_SCORE,
    ProbeEvidence,
    assumed_diameter,
    choose_estimate,
    input_pixels_per_image_pixel,
    probe_evidence,
    scale_for_diameter,
)
from inference.sizing import Bucket, check_buckets, choose_bucket, default_buckets, input_size, pad_batch
from inference.tiling import TilePlan, check_overlap, cut_tile, default_overlap, finish_tile, merge_tiles, plan_tiles
from model.finishing import Instance, finish_outputs
from model.input_contract import SCALE_LIMITS, InputContract
from model.intensity import Decoded
from model.mask_contract import MaskFormat
from model.runtime_protocol import Runtime

Scale = float | Literal["auto"]
Outputs = dict[str, np.ndarray]
# The score threshold of answers for models that record no recommended one (checkpoints trained before it).
FALLBACK_SCORE_THRESHOLD = 0.3
# The scale a caller gets without asking for one (or for a diameter): estimated per image for models that
# record their training objects' size, so that an image from another microscope is right by default; the
# model's own (OWN_SCALE) for models that record none.
DEFAULT_SCALE: Scale = "auto"
OWN_SCALE = 1.0
DEFAULT_SCALE_HELP = "auto (the model's own scale, 1, for models that record no training object size)"
# scale=auto keeps the model's own scale when the estimate lies within this factor of it (the estimate's noise
# on images at the training magnification would otherwise cost accuracy and a second pass).
AUTO_SNAP = 1.25
# scale=auto's probes: the model's own scale, and scales for objects about three times larger and smaller than
# the training objects (a model trained with scale jitter detects objects of about a third to three times its
# training size at each); the probes other than the own scale's run on a bucket's sides divided by this.
AUTO_PROBE_SCALES = (1.0, 1 / 3, 3.0)
AUTO_PROBE_SHRINK = 2


@dataclass(frozen=True)
class SegmentOptions:
    """What a caller asks of one image; None takes the model's own default."""

    score_threshold: float | None = None  # None: the model's recommended threshold
    max_detections: int | None = None  # at most this many instances (highest scores)
    mask_format: MaskFormat = "rle"
    scale: Scale | None = None  # a factor on the model's own input size, or "auto"; None: ``default_scale``
    diameter: float | None = None  # instead of a scale: the objects' diameter in image pixels
    channel: int | None = None  # microscopy models: the channel to segment (default: the channel rule)
    measure: bool = False  # per-instance measurements (area, centroid, ..., intensities of the original)


@dataclass(frozen=True)
class Segmentation:
    """One image's answer: instances in original pixels, descending score, and how it was computed."""

    instances: list[Instance]
    image_size: tuple[int, int]  # (H, W) after EXIF orientation
    scale: float  # the caller scale it ran at (asked, derived from a diameter, or chosen by scale=auto)
    resize_factor: float  # input pixels per image pixel actually applied (the model's own scale times ``scale``)
    diameter: float | None  # the object diameter (image pixels) that scale assumes; None without an object size
    score_threshold: float  # detections below it were dropped
    tiles: int  # inputs of the answering pass (1: the image fit a bucket whole)
    warnings: list[str] = field(default_factory=list)
    measurements: list[Measurement | None] | None = None  # per instance, when asked for
    answered_by_probe: bool = False  # scale=auto's probe pass was the answer (no second pass ran)
    # Seconds per stage where the driver measured them (``run_sync``, ``Predictor``): decode, prepare (resize
    # or cut), infer (runtime calls, padding included), finish (paste, threshold, encode, merge); probe
    # passes included.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PassResult:
    """What a driver sends back for a pass: its merged instances, and how many of its inputs returned the
    graph's maximum number of detections (the image may hold more objects than were answered)."""

    instances: list[Instance]
    saturated: int


@dataclass(frozen=True)
class Pass:
    """One image at one scale: the inputs the runtime runs (the resized image, or its tiles, all padded into
    ``bucket``) and how their outputs become the image's instances."""

    scale: float
    image_size: tuple[int, int]
    bucket: Bucket
    inputs: list[np.ndarray]  # [3, h, w] uint8 each, unpadded
    plan: TilePlan | None  # None: one whole image
    finishing: dict[str, Any]  # ``finish_image`` keywords but sizes and the cap
    limit: int | None  # cap on the answer's instances
    max_detections: int  # what the graph returns at most per input

    def finish(self, index: int, outputs: Outputs) -> list[Instance]:
        """Input ``index``'s graph outputs (one batch element) -> its instances in the image's frame."""
        if self.plan is None:
            pixels = self.inputs[index]
            size = (int(pixels.shape[1]), int(pixels.shape[2]))
            return finish_outputs(
                outputs, input_size=size, image_size=self.image_size, max_detections=self.limit, **self.finishing
            )
        return finish_tile(outputs, self.plan, self.plan.tiles[index], **self.finishing)

    def saturated(self, outputs: Outputs) -> bool:
        """Whether one input's graph returned as many detections as it can, its last still scoring at least the
        pass's threshold (so the cap may have cut objects the answer would hold; a model that fills its
        maximum with detections below the threshold cut nothing)."""
        count = int(outputs["num_dets"])
        if count < self.max_detections:
            return False
        return float(np.asarray(outputs["scores"])[:count].min()) >= self.finishing["score_threshold"]

    def collect(self, per_input: Sequence[list[Instance]], saturated: int) -> PassResult:
        """Every input's instances (input order) as the image's: the whole image's as they are, tiles merged."""
        if self.plan is None:
            return PassResult(list(per_input[0]), saturated)
        return PassResult(merge_tiles(self.plan, list(per_input), self.limit), saturated)


Steps = Generator[Pass, PassResult, Segmentation]


class ImagePipeline:
    """One model's steps from image bytes to instances, around a runtime it does not hold: its graph
    metadata (input contract, mask finishing, thresholds), shape buckets, tile overlap and pixel limit."""

    def __init__(
        self,
        metadata: GraphMetadata,
        *,
        buckets: Sequence[Bucket] | None = None,
        tile_overlap: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        finishing_threads: int = 1,
    ) -> None:
        """``buckets`` default to the contract's (``default_buckets``), ``tile_overlap`` (input pixels) to
        ``default_overlap`` of them; a ValueError names what is wrong with either."""
        self.metadata = metadata
        self.contract: InputContract = metadata.input
        self.buckets = check_buckets(buckets, self.contract) if buckets else default_buckets(self.contract)
        self.tile_overlap = default_overlap(self.buckets) if tile_overlap is None else tile_overlap
        check_overlap(self.buckets, self.tile_overlap)
        self.max_image_pixels = max_image_pixels
        self.finishing_threads = finishing_threads
        configure_pil(max_image_pixels)

    @property
    def score_threshold(self) -> float:
        """The score threshold answers default to: the model's recommended one (chosen on its validation
        split), or ``FALLBACK_SCORE_THRESHOLD`` for models that record none."""
        recommended = self.metadata.recommended_score_threshold
        return FALLBACK_SCORE_THRESHOLD if recommended is None else recommended

    @property
    def default_scale(self) -> Scale:
        """The scale of a request that asks for none (and no diameter): ``DEFAULT_SCALE`` where the model can
        estimate one, else ``OWN_SCALE``."""
        return DEFAULT_SCALE if self.contract.object_size is not None else OWN_SCALE

    @property
    def expected_diameter(self) -> float | None:
        """The object diameter (image pixels) the model expects at its own scale, for size rules that do not
        depend on the image ("scale"); None otherwise or without a recorded object size."""
        contract = self.contract
        if contract.object_size is None or contract.resize != "scale":
            return None
        return contract.object_size / contract.scale

    def check(self, options: SegmentOptions) -> None:
        """``UnusableInput`` for options this model cannot honour, before any image is read."""
        if options.scale is not None and options.diameter is not None:
            raise UnusableInput("give a scale or a diameter, not both")
        if (options.scale == "auto" or options.diameter is not None) and self.contract.object_size is None:
            asked = "scale=auto" if options.scale == "auto" else "diameter"
            raise UnusableInput(
                f"{asked} needs a model that records its training object size; this one does not "
                "(retrain it, or pass a scale number)"
            )
        if options.diameter is not None and not options.diameter > 0:
            raise UnusableInput(f"diameter must be a positive number of pixels, got {options.diameter}")
        if options.measure and options.mask_format == "none":
            raise UnusableInput("measurements need masks: use mask_format rle or polygon")

    def decode(self, data: bytes, channel: int | None = None) -> Decoded:
        """Image file bytes -> the model's RGB by its intensity rule, with the plane it was read from and how
        colourful the file is (``inference.decode``)."""
        return decode_image(data, self.contract, channel, self.max_image_pixels)

    def plan(
        self,
        image: np.ndarray,
        scale: float,
        options: SegmentOptions,
        score_threshold: float,
    ) -> Pass:
        """The pass of ``image`` ([H, W, 3] uint8) at caller scale ``scale``: the image resized into its bucket,
        or, when no bucket holds it, cut into tiles (``ImageTooLarge`` when the scale makes it too large)."""
        height, width = image.shape[:2]
        size = input_size((height, width), self.contract, scale, self.max_image_pixels)
        meta = self.metadata
        finishing = {
            # A boxes-only graph (plain FCOS, evaluated in training) finishes boxes; its mask kind is never read.
            "mask_kind": meta.mask_kind or "box28",
            "mask_threshold": meta.mask_threshold,
            "box_padding": meta.box_padding or 0,
            "score_threshold": score_threshold,
            "mask_format": options.mask_format if meta.mask_kind is not None else "none",
            "workers": self.finishing_threads,
        }
        plan = plan_tiles((height, width), size, self.buckets, self.tile_overlap)
        if plan is None:
            inputs = [self.contract.resize_image(image, scale)]
            bucket = choose_bucket(self.buckets, size, self.contract.size_divisibility)
            limit = options.max_detections
        else:
            inputs = [cut_tile(image, tile) for tile in plan.tiles]
            bucket = plan.bucket
            limit = meta.max_detections * len(inputs)  # what the tiles can give at most
            limit = limit if options.max_detections is None else min(limit, options.max_detections)
        return Pass(
            scale=scale,
            image_size=(height, width),
            bucket=bucket,
            inputs=inputs,
            plan=plan,
            finishing=finishing,
            limit=limit,
            max_detections=meta.max_detections,
        )

    def steps(self, image: Decoded, options: SegmentOptions) -> Steps:
        """The passes ``image`` needs (yielded; each sent back its ``PassResult``) and its answer (returned).

        ``scale=auto`` first runs a probe pass (``auto_scale``), which is the answer itself when the image keeps
        the model's own scale; a diameter gives the scale directly. The last pass yielded is the answering
        one."""
        self.check(options)
        threshold = self.score_threshold if options.score_threshold is None else options.score_threshold
        warnings = colour_hints(self.contract, image.colour_spread)
        size = image.rgb.shape[:2]
        probed: tuple[Pass, PassResult] | None = None
        if options.diameter is not None:
            scale, clamped = scale_for_diameter(self.contract, options.diameter, size)
            if clamped:
                warnings.append(
                    f"diameter {options.diameter:g} px asks for a scale outside {SCALE_LIMITS}; {scale:g} used"
                )
        elif (options.scale or self.default_scale) == "auto":
            scale, probed = yield from self.auto_scale(image.rgb, options, threshold, warnings)
        else:
            scale = float(options.scale or self.default_scale)
        if probed is None:
            answering = self.plan(image.rgb, scale, options, threshold)
            result = yield answering
        else:  # the probe ran the whole image at the scale chosen: it is the answer
            answering, result = probed
        meta, resize_factor = self.metadata, input_pixels_per_image_pixel(self.contract, size, scale)
        warnings += capacity_hints(options.max_detections, meta.max_detections, len(answering.inputs), result.saturated)
        input_megapixels = size[0] * size[1] * resize_factor**2 / 1e6
        warnings += density_hints(len(result.instances), input_megapixels, meta.object_density)
        return Segmentation(
            instances=result.instances,
            image_size=answering.image_size,
            scale=scale,
            resize_factor=resize_factor,
            diameter=assumed_diameter(self.contract, size, scale),
            score_threshold=threshold,
            tiles=len(answering.inputs),
            warnings=warnings,
            measurements=measure(result.instances, image.plane) if options.measure else None,
            answered_by_probe=probed is not None,
        )

    def probe_region(self, image: np.ndarray, scale: float = 1.0, shrink: int = 1) -> np.ndarray:
        """What a ``scale=auto`` probe at caller scale ``scale`` runs on: the image, or for a scale-rule model,
        when the image at that scale would not fit the largest shape bucket with its sides divided by
        ``shrink``, its centre as large as that holds (one input: a probe costs at most one bucket's inference
        whatever the image's size)."""
        height, width = image.shape[:2]
        if self.contract.resize != "scale":
            return image
        factor = input_pixels_per_image_pixel(self.contract, (height, width), scale)
        crops = [
            (min(height, max(1, int(b[0] / shrink / factor))), min(width, max(1, int(b[1] / shrink / factor))))
            for b in self.buckets
        ]
        crop_h, crop_w = max(crops, key=lambda hw: hw[0] * hw[1])
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return image[top : top + crop_h, left : left + crop_w]

    def auto_scale(
        self, image: np.ndarray, options: SegmentOptions, threshold: float, warnings: list[str]
    ) -> Generator[Pass, PassResult, tuple[float, tuple[Pass, PassResult] | None]]:
        """``scale=auto``: a probe pass at each of ``AUTO_PROBE_SCALES`` on its ``probe_region`` (the model's own
        scale on up to one bucket, the others on a quarter of one), and the scale implied by the probe that
        agrees with itself, support breaking ties (``inference.scale.choose_estimate``), kept
        at the model's own where it is within ``AUTO_SNAP`` of it (or no probe measured objects). A probe of
        the whole image at the model's own scale, when the scale stays, is the answer itself: it is finished
        as the answer (masks as asked, detections from the lower of the answer's and the estimate's
        thresholds, so that the answer's are a subset; the caller's cap applied after). Returns the scale, and
        that probe's pass and result when they answer."""
        evidence: list[ProbeEvidence] = []
        own: tuple[Pass, PassResult, bool] | None = None
        for probe_scale in AUTO_PROBE_SCALES:
            region = self.probe_region(image, probe_scale, 1 if probe_scale == 1.0 else AUTO_PROBE_SHRINK)
            whole = probe_scale == 1.0 and region.shape == image.shape
            mask_format = options.mask_format if whole else "none"  # only a possible answer needs masks
            probe_options = replace(options, max_detections=None, mask_format=mask_format)
            probe = self.plan(region, probe_scale, probe_options, min(threshold, AUTO_MIN_SCORE))
            result = yield probe
            boxes = np.array([i.box for i in result.instances], dtype=np.float32).reshape(-1, 4)
            scores = np.array([i.score for i in result.instances], dtype=np.float32)
            evidence.append(probe_evidence(self.contract, boxes, scores, region.shape[:2], probe_scale))
            if probe_scale == 1.0:
                own = (probe, result, whole)
        chosen = choose_estimate(evidence)
        if chosen is None or chosen.estimate is None:
            warnings.append(
                "scale=auto could not measure the objects (too few confident ones, or probes that disagree); "
                "the model's own scale was used"
            )
            scale = 1.0
        else:
            if chosen.estimate.clamped:
                warnings.append(f"scale=auto measured objects outside what {SCALE_LIMITS} can bring to size")
            scale = chosen.estimate.scale if abs(np.log(chosen.estimate.scale)) > np.log(AUTO_SNAP) else 1.0
        if scale != 1.0 or own is None or not own[2]:
            return scale, None
        probe, result, _ = own
        kept = [i for i in result.instances if i.score >= threshold][: options.max_detections]
        return 1.0, (replace(probe, limit=options.max_detections), replace(result, instances=kept))


def advance(steps: Steps, result: PassResult | None) -> Pass | Segmentation:
    """The next pass of ``steps`` (``result``: the last pass's, None to start) or, once it returns, the answer.
    (A generator's return arrives as StopIteration, which must not cross an executor's future.)"""
    try:
        return next(steps) if result is None else steps.send(result)
    except StopIteration as done:
        return done.value


def run_sync(steps: Steps, runtime: Runtime, pad_value: Sequence[int], batch_size: int = 1) -> Segmentation:
    """Drive ``steps`` to its answer in this thread: each pass's inputs ``batch_size`` at a time through
    ``runtime``, padded into the pass's bucket. The answer's ``timings`` get the seconds of each stage."""
    timings = dict.fromkeys(("prepare", "infer", "finish"), 0.0)
    started = time.perf_counter()
    step = advance(steps, None)
    while isinstance(step, Pass):
        timings["prepare"] += time.perf_counter() - started
        per_input: list[list[Instance]] = []
        saturated = 0
        for first in range(0, len(step.inputs), batch_size):
            chunk = step.inputs[first : first + batch_size]
            started = time.perf_counter()
            outputs = runtime.infer(pad_batch(chunk, step.bucket, pad_value))
            timings["infer"] += time.perf_counter() - started
            started = time.perf_counter()
            for i in range(len(chunk)):
                one = {name: value[i] for name, value in outputs.items()}
                saturated += step.saturated(one)
                per_input.append(step.finish(first + i, one))
            timings["finish"] += time.perf_counter() - started
        started = time.perf_counter()
        result = step.collect(per_input, saturated)
        timings["finish"] += time.perf_counter() - started
        started = time.perf_counter()
        step = advance(steps, result)
    timings["prepare"] += time.perf_counter() - started  # the last step: building the answer
    step.timings.update(timings)
    return step
