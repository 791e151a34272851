"""Structure-aware mutation of PNG and JPEG bytes, for fuzzing the gateway's image decoding.

Random bytes rarely get past a decoder's first check; these mutations keep most of a valid
file and break one structure at a time (a PNG chunk's type, length, CRC or IHDR field, a
JPEG segment's frame size, tables or scan), so that the decoder's deeper paths are reached.
`mutant(index)` is deterministic: the same index always gives the same bytes, so a failure
is reproduced from the index alone.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
from PIL import Image, PngImagePlugin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Values a decoder may handle badly: zero, one, past a 16-bit or 31-bit field, the maximum.
EDGE_SIDES = (0, 1, 2, 47, 255, 256, 4096, 65_535, 65_536, 100_000, 2**31 - 1, 2**31, 2**32 - 1)
PNG_BIT_DEPTHS = (0, 1, 2, 3, 4, 7, 8, 16, 32, 255)
PNG_COLOUR_TYPES = (0, 1, 2, 3, 4, 5, 6, 7, 255)
# Chunk types a PNG reader treats specially (APNG's included), and non-letter ones.
PNG_CHUNK_TYPES = (
    b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"iCCP", b"tEXt", b"zTXt", b"iTXt", b"pHYs",
    b"gAMA", b"sRGB", b"cHRM", b"eXIf", b"acTL", b"fcTL", b"fdAT", b"ID\x00T", b"\x00\x00\x00\x00",
    b"I D1", b"\xff\xfe\x80\x7f",
)  # fmt: skip
JPEG_SOF = range(0xC0, 0xC4)
JPEG_DQT, JPEG_DHT, JPEG_SOS, JPEG_EOI = 0xDB, 0xC4, 0xDA, 0xD9
# Markers a JPEG reader parses itself: APP segments (Exif, MPF, Adobe), DRI, COM.
JPEG_EXTRA_SEGMENTS = (
    (0xE1, b"Exif\x00\x00"),
    (0xE2, b"MPF\x00"),
    (0xE2, b"ICC_PROFILE\x00"),
    (0xEE, b"Adobe"),
    (0xE0, b"JFIF\x00"),
    (0xDD, b""),
    (0xFE, b""),
)


# ----------------------------------------------------------------------------- seeds


def _pixels(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Smooth gradients with noise: compressible like a photograph, not like a flat fill."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = (xs * 5 + ys * 3)[..., None] + np.arange(channels) * 60
    noisy = base + rng.integers(0, 24, (height, width, channels))
    return (noisy % 256).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def interlaced_png(pixels: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (Pillow only writes non-interlaced ones)."""
    height, width = pixels.shape[:2]
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2))
    passes += ((0, 1, 1, 2),)
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = pixels[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


@cache
def seeds() -> tuple[bytes, ...]:
    """Small valid PNGs (every colour type, palette with transparency, text and ICC chunks,
    1-bit, interlaced, several IDAT chunks) and JPEGs (baseline, progressive, grey, CMYK,
    with restart markers and Exif)."""
    rgb = Image.fromarray(_pixels(16, 16, 3, 0))
    rgba = Image.fromarray(_pixels(20, 24, 4, 1))
    grey = Image.fromarray(_pixels(32, 32, 1, 2)[..., 0])
    wide = Image.fromarray(_pixels(24, 48, 3, 3))
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "fuzz seed")
    text.add_text("Title", "zipped " * 8, zip=True)
    text.add_itxt("Author", "ünïcødé", lang="en", tkey="Author")
    exif = Image.Exif()
    exif[0x010F] = "propscope"  # Make
    exif[0x0112] = 6  # Orientation
    palette = wide.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return (
        _save(rgb, "PNG"),
        _save(rgba, "PNG"),
        _save(grey, "PNG"),
        _save(grey.convert("LA"), "PNG"),
        _save(palette, "PNG", transparency=3),
        _save(grey.convert("1"), "PNG"),
        _save(rgb, "PNG", pnginfo=text, icc_profile=b"\0" * 128, dpi=(72, 72)),
        _save(wide, "PNG", compress_level=0),  # stored deflate blocks, long IDAT
        interlaced_png(_pixels(17, 19, 3, 4)),
        _split_idat(_save(rgb, "PNG"), parts=3),
        _save(wide, "JPEG", quality=90),
        _save(rgb, "JPEG", quality=50, progressive=True),
        _save(grey, "JPEG", quality=75),
        _save(rgba.convert("CMYK"), "JPEG"),
        _save(wide, "JPEG", subsampling=0, restart_marker_blocks=2),
        _save(rgb, "JPEG", exif=exif.tobytes(), optimize=True),
    )


def _split_idat(png: bytes, parts: int) -> bytes:
    """The same PNG with its compressed data spread over `parts` IDAT chunks."""
    chunks = parse_png(png)
    data = b"".join(chunk.data for chunk in chunks if chunk.kind == b"IDAT")
    step = -(-len(data) // parts)
    idats = [Chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step)]
    first = next(i for i, chunk in enumerate(chunks) if chunk.kind == b"IDAT")
    rest = [chunk for chunk in chunks if chunk.kind != b"IDAT"]
    return serialize_png(rest[:first] + idats + rest[first:])


# ----------------------------------------------------------------------------- PNG


@dataclass(frozen=True)
class Chunk:
    """One PNG chunk; `length` and `crc` override the correct values when set."""

    kind: bytes
    data: bytes
    length: int | None = None
    crc: int | None = None

    def to_bytes(self) -> bytes:
        length = len(self.data) if self.length is None else self.length
        crc = zlib.crc32(self.kind + self.data) if self.crc is None else self.crc
        return struct.pack(">I", length) + self.kind + self.data + struct.pack(">I", crc)


def parse_png(data: bytes) -> list[Chunk]:
    """The chunks of a valid PNG."""
    chunks, offset = [], len(PNG_SIGNATURE)
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind = data[offset + 4 : offset + 8]
        chunks.append(Chunk(kind, data[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return chunks


def serialize_png(chunks: list[Chunk]) -> bytes:
    return PNG_SIGNATURE + b"".join(chunk.to_bytes() for chunk in chunks)


def _flip_bits(data: bytes, rng: np.random.Generator, count: int | None = None) -> bytes:
    if not data:
        return data
    flipped = bytearray(data)
    for _ in range(count or int(rng.integers(1, 9))):
        flipped[int(rng.integers(len(flipped)))] ^= 1 << int(rng.integers(8))
    return bytes(flipped)


def _random_bytes(rng: np.random.Generator, low: int = 0, high: int = 64) -> bytes:
    return rng.integers(0, 256, int(rng.integers(low, high + 1)), dtype=np.uint8).tobytes()


def _pick(rng: np.random.Generator, values):
    return values[int(rng.integers(len(values)))]


def _index(rng: np.random.Generator, chunks: list, kind: bytes | None = None) -> int | None:
    """A random chunk's index (of `kind` when given), None when there is none."""
    candidates = [i for i, chunk in enumerate(chunks) if kind is None or chunk.kind == kind]
    return _pick(rng, candidates) if candidates else None


def _png_duplicate(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    i = _index(rng, chunks)
    return chunks[: i + 1] + [chunks[i]] + chunks[i + 1 :]


def _png_drop(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    i = _index(rng, chunks)
    return chunks[:i] + chunks[i + 1 :]


def _png_swap(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    i, j = (_index(rng, chunks) for _ in range(2))
    swapped = list(chunks)
    swapped[i], swapped[j] = chunks[j], chunks[i]
    return swapped


def _png_chunk_type(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    """A chunk renamed: another known type, a non-letter type, or one byte changed; the
    CRC matches the new type or not."""
    i = _index(rng, chunks)
    how = int(rng.integers(3))
    if how == 0:
        kind = _pick(rng, PNG_CHUNK_TYPES)
    elif how == 1:
        kind = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
    else:
        kind = bytearray(chunks[i].kind)
        kind[int(rng.integers(4))] = int(rng.integers(256))
        kind = bytes(kind)
    crc = None if rng.random() < 0.7 else zlib.crc32(chunks[i].kind + chunks[i].data)
    chunks = list(chunks)
    chunks[i] = replace(chunks[i], kind=kind, crc=crc)
    return chunks


def _png_length(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    i = _index(rng, chunks)
    actual = len(chunks[i].data)
    length = _pick(rng, (0, max(0, actual - 1), actual + 1, actual + 100, 2**31 - 1, 2**32 - 1))
    chunks = list(chunks)
    chunks[i] = replace(chunks[i], length=int(length))
    return chunks


def _png_crc(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    i = _index(rng, chunks)
    chunks = list(chunks)
    chunks[i] = replace(chunks[i], crc=int(rng.integers(0, 2**32)))
    return chunks


def _png_header(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    """One or more IHDR fields changed (huge sides, any bit depth or colour type,
    compression, filter and interlace methods), CRC mostly correct."""
    i = _index(rng, chunks, b"IHDR")
    if i is None:
        return chunks
    fields = list(struct.unpack(">IIBBBBB", chunks[i].data[:13].ljust(13, b"\0")))
    for field in rng.choice(7, size=int(rng.integers(1, 4)), replace=False):
        if field < 2:
            fields[field] = (
                int(_pick(rng, EDGE_SIDES)) if rng.random() < 0.7 else int(rng.integers(1, 300))
            )
        elif field == 2:
            fields[2] = int(_pick(rng, PNG_BIT_DEPTHS))
        elif field == 3:
            fields[3] = int(_pick(rng, PNG_COLOUR_TYPES))
        else:
            fields[field] = int(_pick(rng, (0, 1, 2, 255)))
    header = struct.pack(">IIBBBBB", *fields)
    if rng.random() < 0.1:
        header = header[: int(rng.integers(13))]
    chunks = list(chunks)
    chunks[i] = replace(
        chunks[i], data=header, crc=None if rng.random() < 0.9 else int(rng.integers(2**32))
    )
    return chunks


def _png_compressed_flip(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    """Bits flipped in compressed data (IDAT, zTXt, iCCP), CRC recomputed."""
    i = _index(rng, chunks, b"IDAT") if rng.random() < 0.8 else _index(rng, chunks)
    if i is None:
        return chunks
    chunks = list(chunks)
    chunks[i] = replace(chunks[i], data=_flip_bits(chunks[i].data, rng))
    return chunks


def _png_pixel_data(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    """Valid zlib over damaged scanlines: filter bytes and pixels changed, rows cut or
    added, so that the decompressor succeeds and the unfiltering sees the damage."""
    idats = [chunk for chunk in chunks if chunk.kind == b"IDAT"]
    try:
        raw = zlib.decompress(b"".join(chunk.data for chunk in idats))
    except zlib.error:
        return chunks
    how = int(rng.integers(3))
    if how == 0:
        raw = _flip_bits(raw, rng, int(rng.integers(1, 33)))
    elif how == 1:
        raw = raw[: int(rng.integers(len(raw) + 1))]
    else:
        raw = raw + _random_bytes(rng, 1, 256)
    first = next(i for i, chunk in enumerate(chunks) if chunk.kind == b"IDAT")
    rest = [chunk for chunk in chunks if chunk.kind != b"IDAT"]
    return rest[:first] + [Chunk(b"IDAT", zlib.compress(raw))] + rest[first:]


def _png_extra_idat(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    """Another IDAT-like chunk after the first IDAT: a copy, random data, or one whose type
    has non-letter bytes (the chunk that made Pillow raise SyntaxError)."""
    i = _index(rng, chunks, b"IDAT")
    if i is None:
        return chunks
    kind = _pick(rng, (b"IDAT", b"IDAT", b"ID\x00T", b"I\xffAT", b"IDA ", b"1DAT"))
    data = chunks[i].data if rng.random() < 0.5 else _random_bytes(rng)
    return chunks[: i + 1] + [Chunk(kind, data)] + chunks[i + 1 :]


def _png_insert(chunks: list[Chunk], rng: np.random.Generator) -> list[Chunk]:
    """A chunk of a type the reader parses (APNG, text, palette, ICC...) with random data."""
    i = int(rng.integers(len(chunks) + 1))
    return chunks[:i] + [Chunk(_pick(rng, PNG_CHUNK_TYPES), _random_bytes(rng))] + chunks[i:]


PNG_OPERATIONS: tuple[Callable[[list[Chunk], np.random.Generator], list[Chunk]], ...] = (
    _png_duplicate,
    _png_drop,
    _png_swap,
    _png_chunk_type,
    _png_length,
    _png_crc,
    _png_header,
    _png_header,
    _png_compressed_flip,
    _png_pixel_data,
    _png_extra_idat,
    _png_insert,
)


def mutate_png(data: bytes, rng: np.random.Generator) -> bytes:
    chunks = parse_png(data)
    for _ in range(int(rng.integers(1, 4))):
        if chunks:
            chunks = _pick(rng, PNG_OPERATIONS)(chunks, rng)
    return _byte_level(serialize_png(chunks), rng)


# ----------------------------------------------------------------------------- JPEG


@dataclass(frozen=True)
class Segment:
    """One JPEG marker segment; a scan (SOS) carries its entropy-coded data in `scan`;
    `length` overrides the correct length field when set."""

    marker: int
    payload: bytes
    scan: bytes = b""
    length: int | None = None

    def to_bytes(self) -> bytes:
        if self.marker == JPEG_EOI:
            return b"\xff\xd9"
        length = len(self.payload) + 2 if self.length is None else self.length
        return bytes([0xFF, self.marker]) + struct.pack(">H", length) + self.payload + self.scan


def parse_jpeg(data: bytes) -> list[Segment]:
    """The segments of a valid JPEG after its SOI, up to and including EOI."""
    segments, offset = [], 2
    while offset < len(data):
        marker = data[offset + 1]
        if marker == JPEG_EOI:
            segments.append(Segment(JPEG_EOI, b""))
            break
        (length,) = struct.unpack_from(">H", data, offset + 2)
        payload = data[offset + 4 : offset + 2 + length]
        offset += 2 + length
        scan_end = offset
        while marker == JPEG_SOS:  # entropy-coded data runs to a marker other than RSTn
            if data[scan_end] != 0xFF:
                scan_end += 1
            elif data[scan_end + 1] == 0 or data[scan_end + 1] in range(0xD0, 0xD8):
                scan_end += 2  # a stuffed 0xFF or a restart marker
            else:
                break
        segments.append(Segment(marker, payload, data[offset:scan_end]))
        offset = scan_end
    return segments


def serialize_jpeg(segments: list[Segment]) -> bytes:
    return b"\xff\xd8" + b"".join(segment.to_bytes() for segment in segments)


def _replace_payload(segments: list[Segment], i: int, payload: bytes) -> list[Segment]:
    segments = list(segments)
    segments[i] = replace(segments[i], payload=payload)
    return segments


def _jpeg_frame(segments: list[Segment], rng: np.random.Generator) -> list[Segment]:
    """The start of frame changed: sides (0, huge), precision, component count or
    sampling factors."""
    candidates = [i for i, segment in enumerate(segments) if segment.marker in JPEG_SOF]
    if not candidates:
        return segments
    i = _pick(rng, candidates)
    frame = bytearray(segments[i].payload)
    how = int(rng.integers(4))
    if how == 0:
        side = (
            int(_pick(rng, (0, 1, 2, 255, 4096, 65_535)))
            if rng.random() < 0.7
            else int(rng.integers(1, 300))
        )
        start = _pick(rng, (1, 3))  # height, width
        frame[start : start + 2] = struct.pack(">H", side)
    elif how == 1:
        frame[0] = int(_pick(rng, (0, 1, 8, 12, 16, 255)))
    elif how == 2:
        frame[5] = int(_pick(rng, (0, 1, 2, 3, 4, 5, 255)))
    else:  # a component's sampling factors or quantisation table
        component = 6 + 3 * int(rng.integers(max(1, (len(frame) - 6) // 3)))
        if component + 2 < len(frame):
            frame[component + int(rng.integers(1, 3))] = int(rng.integers(256))
    return _replace_payload(segments, i, bytes(frame))


def _jpeg_tables(segments: list[Segment], rng: np.random.Generator) -> list[Segment]:
    """A quantisation or Huffman table damaged: its class/id byte, its counts, its values,
    or cut short."""
    marker = _pick(rng, (JPEG_DQT, JPEG_DHT))
    candidates = [k for k, segment in enumerate(segments) if segment.marker == marker]
    if not candidates:
        return segments
    i = _pick(rng, candidates)
    table = bytearray(segments[i].payload)
    how = int(rng.integers(4))
    if how == 0:
        table[0] = int(rng.integers(256))
    elif how == 1 and marker == JPEG_DHT and len(table) > 17:
        table[1 + int(rng.integers(16))] = int(rng.integers(256))  # a code length count
    elif how == 2:
        table = bytearray(_flip_bits(bytes(table), rng))
    else:
        table = table[: int(rng.integers(len(table) + 1))]
    return _replace_payload(segments, i, bytes(table))


def _jpeg_duplicate_scan(segments: list[Segment], rng: np.random.Generator) -> list[Segment]:
    candidates = [i for i, segment in enumerate(segments) if segment.marker == JPEG_SOS]
    i = _pick(rng, candidates)
    at = int(rng.integers(len(segments) + 1))
    return segments[:at] + [segments[i]] + segments[at:]


def _jpeg_scan(segments: list[Segment], rng: np.random.Generator) -> list[Segment]:
    """A scan's header (component selectors, spectral range) or entropy data damaged."""
    candidates = [i for i, segment in enumerate(segments) if segment.marker == JPEG_SOS]
    i = _pick(rng, candidates)
    segments = list(segments)
    if rng.random() < 0.5:
        segments[i] = replace(segments[i], payload=_flip_bits(segments[i].payload, rng))
    else:
        scan = segments[i].scan
        if rng.random() < 0.5:
            scan = scan[: int(rng.integers(len(scan) + 1))]
        segments[i] = replace(segments[i], scan=_flip_bits(scan, rng))
    return segments


def _jpeg_duplicate(segments: list[Segment], rng: np.random.Generator) -> list[Segment]:
    i = int(rng.integers(len(segments)))
    return segments[: i + 1] + [segments[i]] + segments[i + 1 :]


def _jpeg_drop(segments: list[Segment], rng: np.random.Generator) -> list[Segment]:
    i = int(rng.integers(len(segments)))
    return segments[:i] + segments[i + 1 :]


def _jpeg_swap(segments: list[Segment], rng: np.random.Generator) -> list[Segment]:
    i, j = (int(rng.integers(len(segments))) for _ in range(2))
    swapped = list(segments)
    swapped[i], swapped[j] = segments[j], segments[i]
    return swapped


def _jpeg_length(segments: list[Segment], rng: np.random.Generator) -> list[Segment]:
    i = int(rng.integers(len(segments)))
    actual = len(segments[i].payload) + 2
    length = int(_pick(rng, (0, 1, 2, actual - 1, actual + 1, actual + 50, 65_535)))
    segments = list(segments)
    segments[i] = replace(segments[i], length=max(0, length))
    return segments


def _jpeg_insert(segments: list[Segment], rng: np.random.Generator) -> list[Segment]:
    """An Exif, MPF, ICC, Adobe, JFIF, restart-interval or comment segment of random
    content, placed anywhere before the end."""
    marker, prefix = JPEG_EXTRA_SEGMENTS[int(rng.integers(len(JPEG_EXTRA_SEGMENTS)))]
    segment = Segment(marker, prefix + _random_bytes(rng, 0, 48))
    if rng.random() < 0.3:  # a well-formed TIFF header, so that the Exif/MPF parser runs
        endian = _pick(rng, (b"II*\x00\x08\x00\x00\x00", b"MM\x00*\x00\x00\x00\x08"))
        segment = Segment(marker, prefix + endian + _random_bytes(rng, 0, 64))
    at = int(rng.integers(len(segments)))
    return segments[:at] + [segment] + segments[at:]


JPEG_OPERATIONS: tuple[Callable[[list[Segment], np.random.Generator], list[Segment]], ...] = (
    _jpeg_frame,
    _jpeg_frame,
    _jpeg_tables,
    _jpeg_tables,
    _jpeg_duplicate_scan,
    _jpeg_scan,
    _jpeg_duplicate,
    _jpeg_drop,
    _jpeg_swap,
    _jpeg_length,
    _jpeg_insert,
)


def mutate_jpeg(data: bytes, rng: np.random.Generator) -> bytes:
    segments = parse_jpeg(data)
    for _ in range(int(rng.integers(1, 4))):
        if any(segment.marker == JPEG_SOS for segment in segments):
            segments = _pick(rng, JPEG_OPERATIONS)(segments, rng)
    return _byte_level(serialize_jpeg(segments), rng)


# ----------------------------------------------------------------------------- both


def _byte_level(data: bytes, rng: np.random.Generator) -> bytes:
    """Sometimes also truncated, bit-flipped anywhere, or followed by garbage."""
    roll = rng.random()
    if roll < 0.15:
        return data[: int(rng.integers(len(data) + 1))]
    if roll < 0.25:
        return _flip_bits(data, rng)
    if roll < 0.3:
        return data + _random_bytes(rng, 1, 64)
    return data


def broken_second_idat_png() -> bytes:
    """Issue 15's finding: image data over three IDAT chunks, the second one's type with a
    non-letter byte (Pillow raises SyntaxError on it)."""
    chunks = parse_png(_split_idat(seeds()[0], parts=3))
    second = [i for i, chunk in enumerate(chunks) if chunk.kind == b"IDAT"][1]
    chunks[second] = replace(chunks[second], kind=b"I\xffAT")
    return serialize_png(chunks)


def mutant(index: int) -> bytes:
    """The index-th mutated image: a seed chosen and mutated by a Generator seeded with
    `index`, so a failure is reproduced from its index."""
    rng = np.random.default_rng(index)
    seed = _pick(rng, seeds())
    return mutate_png(seed, rng) if seed.startswith(PNG_SIGNATURE) else mutate_jpeg(seed, rng)
