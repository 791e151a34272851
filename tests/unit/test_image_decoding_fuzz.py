"""Image decoding against damaged PNGs and JPEGs (issue 15): every caller image either
decodes to uint8 [H, W, 3] or is refused with InvalidArgument naming its field (masks: a
ValueError), whatever Pillow's parsers raise inside; plus the cases fuzzing found.

PROPSCOPE_FUZZ_IMAGES sets how many mutated images run (`make soak` runs 200,000);
a failure prints the mutant's index: `tests.image_mutation.mutant(index)` gives its bytes.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from propscope_server.api.convert import decode_image
from propscope_server.config import Limits
from propscope_server.errors import InvalidArgument
from propscope_server.regions import MAX_MASK_PIXELS, decode_mask
from tests.image_mutation import PNG_SIGNATURE, broken_second_idat_png, mutant, png_chunk

FUZZ_IMAGES = int(os.environ.get("PROPSCOPE_FUZZ_IMAGES", "10000"))
# Where to write the run's figures (make soak: docs/results/image_fuzz.md); unset: nowhere.
FUZZ_RESULTS = os.environ.get("PROPSCOPE_FUZZ_RESULTS")
# One mutant in this many also goes through decode_mask.
MASK_SHARE = 10
LIMITS = Limits()
# What a refusal must never say: Pillow's file object and its own size threshold.
LEAKS = ("BytesIO", " at 0x", "decompression bomb", str(2 * Image.MAX_IMAGE_PIXELS))


def png_of(
    width: int, height: int, depth: int, colour: int, raw: bytes, before: bytes = b""
) -> bytes:
    """A PNG from its scanlines; `before` are chunks placed ahead of IHDR."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + before
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def sixteen_bit_png(colour: int, before: bytes = b"") -> bytes:
    """A 4 x 4 16-bit PNG of colour type `colour` (0 grey, 2 RGB, 4 grey+alpha, 6 RGBA)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = b"\0" + b"\x75\x30" * 4 * channels  # filter byte, then 30000 in every sample
    return png_of(4, 4, 16, colour, row * 4, before)


# ----------------------------------------------------------------------------- fuzzing


def test_every_mutated_image_decodes_or_is_refused_naming_its_field():
    outcomes: Counter[str] = Counter()
    failures = []
    started = time.perf_counter()
    for index in range(FUZZ_IMAGES):
        data = mutant(index)
        try:
            image = decode_image(data, LIMITS)
        except InvalidArgument as refusal:
            outcomes["refused"] += 1
            message = str(refusal)
            if refusal.field != "image" or not message.startswith("image "):
                failures.append((index, "refusal not naming image", message))
            if any(leak in message for leak in LEAKS):
                failures.append((index, "refusal leaks Pillow's words", message))
        except Exception as error:  # the test's point: nothing else may come out
            failures.append((index, type(error).__name__, str(error)))
        else:
            outcomes["decoded"] += 1
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                failures.append((index, "decoded badly", f"{image.dtype} {image.shape}"))
        if index % MASK_SHARE == 0:
            outcomes["masks"] += 1
            try:
                mask = decode_mask(data, 16, 16, LIMITS.max_image_pixels)
                assert mask.dtype == np.float32 and mask.shape == (16, 16)
            except ValueError as refusal:
                if any(leak in str(refusal) for leak in LEAKS):
                    failures.append((index, "mask refusal leaks Pillow's words", str(refusal)))
            except Exception as error:
                failures.append((index, f"mask {type(error).__name__}", str(error)))
    seconds = time.perf_counter() - started
    summary = (
        f"{FUZZ_IMAGES} mutated images: {outcomes['decoded']} decoded, "
        f"{outcomes['refused']} refused (InvalidArgument), {outcomes['masks']} also as masks, "
        f"{len(failures)} failures, {seconds:.1f} s"
    )
    print("\n" + summary)
    if FUZZ_RESULTS:  # make soak records its run
        Path(FUZZ_RESULTS).write_text(f"# Image decoding fuzz (`make soak`)\n\n{summary}.\n")
    assert not failures, "mutant(index), kind, message:\n" + "\n".join(
        f"{index}: {kind}: {message[:200]}" for index, kind, message in failures[:20]
    )
    # The mutations reach the decoder, and most of them break something.
    assert outcomes["decoded"] >= FUZZ_IMAGES // 20
    assert outcomes["refused"] >= FUZZ_IMAGES // 2


def test_the_mutations_are_deterministic():
    assert [mutant(i) for i in range(50)] == [mutant(i) for i in range(50)]
    assert len({mutant(i) for i in range(50)}) > 45


# ----------------------------------------------------------------------------- findings


def test_a_second_idat_with_a_non_letter_type_is_invalid_argument():
    # Pillow raises SyntaxError("broken PNG file") here, which came out as INTERNAL.
    data = broken_second_idat_png()
    with pytest.raises(SyntaxError), Image.open(io.BytesIO(data)) as image:
        image.load()
    with pytest.raises(InvalidArgument, match=r"^image could not be decoded") as refusal:
        decode_image(data, LIMITS)
    assert refusal.value.field == "image"
    with pytest.raises(InvalidArgument) as refusal:
        decode_image(data, LIMITS, "path image 3", field="properties[0].provided_path.images[3]")
    assert refusal.value.field == "properties[0].provided_path.images[3]"
    with pytest.raises(ValueError, match="the mask is not a readable PNG or JPEG image"):
        decode_mask(data, 16, 16)


@pytest.mark.parametrize(
    "data",
    [b"definitely not an image", PNG_SIGNATURE + b"\0" * 40, b"\xff\xd8\xff\xe0garbage"],
    ids=["text", "png_signature_only", "jpeg_start_only"],
)
def test_refusals_say_what_is_wrong_without_pillows_file_object(data):
    with pytest.raises(InvalidArgument) as refusal:
        decode_image(data, LIMITS)
    message = str(refusal.value)
    assert message.startswith("image could not be decoded") and "send" in message
    assert not any(leak in message for leak in LEAKS), message
    with pytest.raises(ValueError) as mask_refusal:
        decode_mask(data, 8, 8)
    assert "BytesIO" not in str(mask_refusal.value)


def jpeg_claiming(width: int, height: int) -> bytes:
    frame = struct.pack(">BHHB", 8, height, width, 3) + b"".join(
        bytes([component, 0x11, 0]) for component in (1, 2, 3)
    )
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame + b"\xff\xd9"


@pytest.mark.parametrize(
    ("data", "size"),
    [
        # over Pillow's own refusal threshold (2 x 89,478,485 pixels)
        (png_of(30_000, 30_000, 8, 2, b""), "30000x30000"),
        (png_of(2**31 - 1, 1, 8, 0, b""), f"{2**31 - 1}x1"),
        (jpeg_claiming(65_535, 65_535), "65535x65535"),
        # between Pillow's warning and its refusal
        (png_of(10_000, 10_000, 8, 2, b""), "10000x10000"),
    ],
    ids=["png_30000", "png_2_31", "jpeg_65535", "png_10000"],
)
def test_a_huge_declared_size_is_refused_quoting_max_image_pixels(data, size):
    with pytest.raises(InvalidArgument) as refusal:
        decode_image(data, LIMITS)
    message = str(refusal.value)
    assert message == (
        f"image is {size} pixels; the limit max_image_pixels is {LIMITS.max_image_pixels}"
    )
    with pytest.raises(ValueError, match=f"the mask is {size} pixels, more than the"):
        decode_mask(data, 8, 8, MAX_MASK_PIXELS)


@pytest.mark.parametrize("colour", [0, 2, 4, 6], ids=["grey", "rgb", "grey_alpha", "rgba"])
def test_sixteen_bit_pngs_of_every_colour_type_are_refused(colour):
    data = sixteen_bit_png(colour)
    with Image.open(io.BytesIO(data)) as image:  # Pillow reads them (RGB/RGBA cut to 8 bits)
        image.load()
    field = "properties[1].provided_path.images[0]"
    with pytest.raises(InvalidArgument) as refusal:
        decode_image(data, LIMITS, "path image", field=field)
    assert str(refusal.value) == (
        "path image is a PNG with 16 bits per channel; send 8 bits per channel (RGB, RGBA or grey)"
    )
    assert refusal.value.field == field


def test_a_sixteen_bit_ihdr_after_another_chunk_is_refused_too():
    # Pillow takes IHDR anywhere before the image data, not only at byte 8.
    data = sixteen_bit_png(2, before=png_chunk(b"tEXt", b"Comment\0first"))
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
    with pytest.raises(InvalidArgument, match="send 8 bits per channel"):
        decode_image(data, LIMITS)


def test_eight_bit_pngs_of_every_colour_type_still_decode():
    for colour, channels in ((0, 1), (2, 3), (4, 2), (6, 4)):
        row = b"\0" + bytes(range(4 * channels))
        image = decode_image(png_of(4, 3, 8, colour, row * 3), LIMITS)
        assert image.dtype == np.uint8 and image.shape == (3, 4, 3)


def test_the_gateway_running_out_of_memory_is_not_blamed_on_the_image(monkeypatch):
    """MemoryError is the gateway's trouble: it must not become "image could not be decoded"."""

    def exhausted(*args, **kwargs):
        raise MemoryError

    data = png_of(4, 4, 8, 0, (b"\0" + b"\x80" * 4) * 4)
    assert decode_image(data, LIMITS).shape == (4, 4, 3)
    monkeypatch.setattr(Image.Image, "convert", exhausted)
    with pytest.raises(MemoryError):
        decode_image(data, LIMITS)
