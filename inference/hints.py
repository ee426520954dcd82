"""What an answer says when it may not be what the caller asked for or expected: the ``warnings`` of a
segmentation, each a sentence for the person who sent the image, saying what to do where there is something.
"""

from __future__ import annotations

from model.input_contract import InputContract

# A colour image read by a grey (microscopy) model: channels differing by more than this share of the range.
COLOUR_SPREAD_WARNING = 0.03
# Far more objects than the model saw: an answer denser than this many times its training images' density.
DENSITY_WARNING_FACTOR = 3.0


def colour_hints(contract: InputContract, colour_spread: float) -> list[str]:
    """A colour image sent to a model that reads one grey microscopy channel (``model.intensity.colour_spread``)."""
    if contract.intensity == "percentile" and colour_spread > COLOUR_SPREAD_WARNING:
        return [
            "this image has colour (its channels differ) but the model reads one grey microscopy channel and "
            "averaged them: for a fluorescence image, send the channel with the objects (channel=0, 1 or 2); "
            "a photo is not what this model knows"
        ]
    return []


def density_hints(objects: int, input_megapixels: float, trained_density: float | None) -> list[str]:
    """Far more objects per input megapixel than the model's training images held (``trained_density``, None
    for models that record none)."""
    if trained_density is None or not objects:
        return []
    density = objects / max(input_megapixels, 1e-9)
    if density <= DENSITY_WARNING_FACTOR * trained_density:
        return []
    return [
        f"{objects} objects is {density / trained_density:.0f}x the density of the model's training images: the "
        "image may not be what the model knows, or its objects are far smaller than it expects (give their diameter)"
    ]


def capacity_hints(asked: int | None, per_input: int, inputs: int, saturated: int) -> list[str]:
    """An answer that may hold fewer instances than asked for (``asked`` above what ``inputs`` inputs of at most
    ``per_input`` detections can give) or than the image holds (``saturated`` inputs returned their maximum)."""
    hints = []
    capacity = per_input * inputs
    if asked is not None and asked > capacity:
        hints.append(
            f"max_detections={asked} is more than this model returns for this image: at most {capacity} "
            f"({per_input} per input, {inputs} input(s))"
        )
    if saturated:
        hints.append(
            f"the model returned its maximum of {per_input} detections on {saturated} of {inputs} input(s): the image "
            "may hold more objects than answered"
        )
    return hints
