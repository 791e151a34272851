"""Property-based fuzzing of Explain (issue 5): whatever the request holds (random field
values, truncated or corrupted images, huge dimensions, non-UTF-8 strings, negative
numbers), every call ends in a status code, never a crash or a hang, and the server keeps
serving.

Requests go out as raw bytes through a generic stub, so that the wire-level tests can send
what the protobuf library refuses to build (invalid UTF-8, negative varints, garbage).
Valid requests stay cheap: at most 12 steps (a few larger ones with one sample and one
property), 2 samples, 3 properties, only the procedural editor and the synthetic
classifiers; the diffusion editors are never named.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from functools import cache

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import graph_pb2 as gpb
from tests.image_mutation import broken_second_idat_png, mutant
from tests.integration.conftest import png, scene_png

METHOD = "/propscope.v1.ExplainService/Explain"
DEADLINE_S = 60.0
CLASSIFIERS = ("synth_unbiased", "synth_hue", "synth_patch", "synth_hue_fp32")
# Slow on CPU: never sent, not even as a random name.
DIFFUSION_EDITORS = frozenset({"ip2p", "sdedit", "ledits"})
# The stack stays up for the whole session, so none of these is an acceptable answer:
# UNKNOWN and INTERNAL are server bugs, DEADLINE_EXCEEDED a hang, UNAVAILABLE or
# CANCELLED a gateway that went away mid-call, DATA_LOSS corruption.
FORBIDDEN = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DATA_LOSS,
    }
)
FORBIDDEN_PROPERTY_CODES = frozenset(code.value[0] for code in FORBIDDEN)

# Error messages longer than this do not fit gRPC's default 8 KiB limit on trailers.
MAX_DETAILS_BYTES = 4096

FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WIRE_SETTINGS = settings(FUZZ_SETTINGS, max_examples=200)


# ----------------------------------------------------------------------------- images


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_claiming(
    width: int, height: int, depth: int = 8, colour: int = 2, idat: bytes = b"\0"
) -> bytes:
    """A PNG whose IHDR (valid CRC) claims width x height over a tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(idat))
        + _chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A baseline JPEG start of frame claiming width x height, and nothing to decode."""
    frame = struct.pack(">BHHB", 8, height, width, 3) + b"".join(
        bytes([component, 0x11, 0]) for component in (1, 2, 3)
    )
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame + b"\xff\xd9"


@cache
def real_bomb() -> bytes:
    """A genuine decompression bomb: 20000 x 20000 1-bit pixels, every row zero, in about 50 kB."""
    side = 20_000
    row = b"\0" * (1 + side // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def encode(image: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    picture = Image.fromarray(image)
    if mode is not None:
        picture = picture.convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def pixels(draw: st.DrawFn, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Small RGB images: a rendered scene, a flat colour or noise, at most 64 x 64."""
    if shape is None:  # the classifiers' own size, or any size down to 1 x 1
        shape = draw(
            st.one_of(st.just((64, 64)), st.tuples(st.integers(1, 64), st.integers(1, 64)))
        )
    height, width = shape
    kind = draw(st.sampled_from(["flat", "scene", "noise"]))
    if kind == "scene" and (height, width) == (64, 64):
        scene = np.asarray(
            Image.open(
                io.BytesIO(
                    scene_png(
                        shape=draw(st.integers(0, 1)),
                        hue_deg=draw(st.floats(0, 360)),
                        radius_px=draw(st.floats(2, 30)),
                        background=draw(st.floats(0, 1)),
                        patch=draw(st.booleans()),
                    )
                )
            ).convert("RGB")
        )
        return scene
    if kind == "noise":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    colour = draw(st.tuples(*[st.integers(0, 255)] * 3))
    return np.full((height, width, 3), colour, dtype=np.uint8)


@st.composite
def encoded(draw: st.DrawFn, image: np.ndarray, valid: bool = False) -> bytes:
    """One image as PNG or JPEG in a mode the gateway takes or, unless `valid`, as
    16-bit PNG, GIF or BMP, which it refuses."""
    accepted = [("PNG", None), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "1")]
    accepted.append(("JPEG", None))
    refused = [("PNG", "I;16"), ("GIF", None), ("BMP", None)]
    fmt, mode = draw(st.sampled_from(accepted if valid else accepted + refused))
    return encode(image, fmt, mode)


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` truncated, with bytes overwritten, or with garbage appended."""
    how = draw(st.sampled_from(["truncate", "corrupt", "append"]))
    if how == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    corrupted = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(corrupted) - 1))
        corrupted[position] = draw(st.integers(0, 255))
    return bytes(corrupted)


HUGE_SIDES = st.sampled_from([0, 1, 513, 2000, 65_535, 100_000, 2**31 - 1, 2**32 - 1])
PNG_MODES = st.sampled_from([(8, 2), (8, 6), (8, 0), (8, 3), (1, 0), (16, 2), (16, 0), (7, 2)])


@st.composite
def hostile_images(draw: st.DrawFn) -> bytes:
    """Bytes that are not a usable small image."""
    kind = draw(
        st.sampled_from(
            [
                "empty",
                "random",
                "broken",
                "png_header",
                "jpeg_header",
                "bomb",
                "oversized",
                "big_valid",
            ]
        )
    )
    if kind == "empty":
        return b""
    if kind == "random":
        prefix = draw(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a"]))
        return prefix + draw(st.binary(max_size=512))
    if kind == "broken":
        return draw(damaged(draw(encoded(draw(pixels())))))
    if kind == "png_header":
        depth, colour = draw(PNG_MODES)
        return png_claiming(draw(HUGE_SIDES), draw(HUGE_SIDES), depth, colour)
    if kind == "jpeg_header":
        return jpeg_claiming(draw(st.integers(0, 65_535)), draw(st.integers(0, 65_535)))
    if kind == "bomb":
        return real_bomb()
    if kind == "oversized":  # just over the fixture's 300 kB image limit
        return b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000
    # decodable, but over the fixture's 512 x 512 pixel limit
    return encode(np.zeros((draw(st.integers(513, 700)), 513, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- fields

LONG = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(1_000, 40_000))
TEXT = st.one_of(
    st.just(""),
    st.text(st.characters(codec="utf-8"), max_size=24),
    st.sampled_from(["\x00", "\u202e", "ünïcødé", "名前", "🧪" * 3, " ", "../etc/passwd", "%s%n"]),
    LONG,
)
NUMBER_TEXT = st.one_of(
    st.sampled_from(
        ["0", "-0", "1", "-1", "3", "1000", "-1000", "1001", "4096", "4097", "1e308", "1e309"]
        + ["-1e309", "nan", "inf", "-inf", "0x10", " 5 ", "1_0", "٣", "1e-320", "2.5", ""]
    ),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
UINT32_EDGES = st.sampled_from([1, 2**31 - 1, 2**31, 2**32 - 1])
UINT64 = st.integers(0, 2**64 - 1)
DOUBLES = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 0.5000001, 1.0, 1e-300, 5e-324, -1.0, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
)
FLOAT32S = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-38, 1e-45, -1e-45, 3.4e38, 0.25, 0.5]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)
OPERATIONS = ("hue", "brightness", "saturation", "blur", "blend", "scale")
PARAMETER_NAMES = st.one_of(
    st.sampled_from(
        ["operation", "region", "amount", "position", "patch_x", "patch_y", "patch_size"]
    ),
    TEXT,
)
PARAMETER_VALUES = st.one_of(
    st.sampled_from(OPERATIONS + ("all", "object", "background", "fixed", "random")),
    NUMBER_TEXT,
    TEXT,
)
# What a request may get wrong; each example breaks a few of these and keeps the rest valid.
FIELDS = (
    "image",
    "model.name",
    "model.version",
    "model.output",
    "model.target",
    "model.preprocessing",
    "properties",
    "property.name",
    "property.source",
    "editor.model",
    "editor.version",
    "editor.parameters",
    "provided_path",
    "steps",
    "samples",
    "permutations",
    "alpha",
    "min_probability_change",
)


def not_diffusion(name: str) -> bool:
    return name not in DIFFUSION_EDITORS


def wild_or(valid: st.SearchStrategy, wild: st.SearchStrategy, field: str, broken: set[str]):
    return st.one_of(valid, wild) if field in broken else valid


@st.composite
def model_refs(draw: st.DrawFn, broken: set[str]) -> pb.ModelRef:
    model = pb.ModelRef(
        name=draw(
            wild_or(
                st.sampled_from(CLASSIFIERS),
                st.one_of(
                    st.sampled_from(["", "procedural", "no_such_model"]),
                    TEXT.filter(not_diffusion),
                ),
                "model.name",
                broken,
            )
        ),
        version=draw(
            wild_or(
                st.sampled_from(["", "1"]),
                st.one_of(st.sampled_from(["0", "2", "-1", "99999999999999999999", "x"]), TEXT),
                "model.version",
                broken,
            )
        ),
        output=draw(wild_or(st.sampled_from(["", "LOGITS"]), TEXT, "model.output", broken)),
    )
    target = draw(st.sampled_from(["none", "class", "predicted"]))
    if target == "class":
        model.target_class = draw(
            wild_or(
                st.integers(0, 1),
                st.one_of(st.integers(2, 3), UINT32_EDGES),
                "model.target",
                broken,
            )
        )
    elif target == "predicted":
        model.predicted_class = draw(st.booleans())
    if "model.preprocessing" in broken:
        vector = st.one_of(
            st.lists(FLOAT32S, min_size=3, max_size=3), st.lists(FLOAT32S, max_size=5)
        )
        model.preprocessing.mean.extend(draw(vector))
        model.preprocessing.std.extend(draw(vector))
        model.preprocessing.output_kind = draw(
            st.one_of(st.integers(0, 3), st.sampled_from([-1, 2**31 - 1, -(2**31)]))
        )
    elif draw(st.booleans()):
        model.preprocessing.mean.extend(
            draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=3, max_size=3))
        )
        model.preprocessing.std.extend(
            draw(st.lists(st.floats(0.125, 1, width=32), min_size=3, max_size=3))
        )
        model.preprocessing.output_kind = draw(st.integers(0, 2))
    return model


@st.composite
def editor_parameters(draw: st.DrawFn, broken: set[str]) -> dict[str, str]:
    if "editor.parameters" in broken:
        return draw(st.dictionaries(PARAMETER_NAMES, PARAMETER_VALUES, max_size=4))
    parameters = {"operation": draw(st.sampled_from(OPERATIONS))}
    optional = {
        "region": st.sampled_from(["all", "object", "background"]),
        "amount": st.one_of(st.just(""), st.floats(-1000, 1000).map(str)),
        "position": st.sampled_from(["fixed", "random"]),
        "patch_x": st.integers(0, 4096).map(str),
        "patch_y": st.integers(0, 4096).map(str),
        "patch_size": st.integers(2, 4096).map(str),
    }
    for name in draw(st.sets(st.sampled_from(sorted(optional)))):
        parameters[name] = draw(optional[name])
    return parameters


@st.composite
def properties(
    draw: st.DrawFn, name: str, image: np.ndarray, broken: set[str], steps: int
) -> pb.Property:
    prop = pb.Property(name=draw(wild_or(st.just(name), TEXT, "property.name", broken)))
    source = draw(
        wild_or(
            st.sampled_from(["editor", "editor", "provided_path"]),
            st.just("none"),
            "property.source",
            broken,
        )
    )
    if source == "editor":
        prop.editor.model = draw(
            wild_or(
                st.just("procedural"),
                st.one_of(
                    st.sampled_from(["", "no_such_editor", "synth_hue"]),
                    TEXT.filter(not_diffusion),
                ),
                "editor.model",
                broken,
            )
        )
        prop.editor.version = draw(
            wild_or(
                st.sampled_from(["", "1"]),
                st.one_of(st.sampled_from(["0", "-1", "x", "99999999999999999999"]), TEXT),
                "editor.version",
                broken,
            )
        )
        prop.editor.parameters.update(draw(editor_parameters(broken)))
    elif source == "provided_path":
        valid_frame = st.one_of(
            pixels(image.shape[:2]).map(png),
            pixels(image.shape[:2]).map(lambda frame: encode(frame, "JPEG")),
        )
        if "provided_path" in broken:
            frame = st.one_of(valid_frame, pixels().flatmap(encoded), hostile_images())
            frames = draw(st.lists(frame, max_size=4))
        else:  # x_1..x_N, enough images for the test to be reachable at alpha 0.01
            length = min(max(steps, 5), 12)
            frames = draw(st.lists(valid_frame, min_size=length, max_size=length))
        prop.provided_path.images.extend(frames)
    return prop


@st.composite
def explain_requests(draw: st.DrawFn) -> pb.ExplainRequest:
    """Random values for every field of ExplainRequest: a few fields broken at a time,
    the rest valid and small (so that a valid request stays cheap)."""
    broken = draw(st.sets(st.sampled_from(FIELDS), max_size=3))
    image = draw(pixels())
    request = pb.ExplainRequest(
        request_id=draw(TEXT),
        image=draw(
            wild_or(
                st.one_of(st.just(png(image)), encoded(image, valid=True)),
                st.one_of(encoded(image), hostile_images()),
                "image",
                broken,
            )
        ),
        model=draw(model_refs(broken)),
        seed=draw(UINT64),
        return_path_images=draw(st.booleans()),
    )
    # 0 is the default (10); a few long paths (170 images and more) with one sample
    # and one property.
    request.steps = draw(
        wild_or(
            st.one_of(st.just(0), st.integers(5, 12)),
            st.one_of(st.integers(1, 4), UINT32_EDGES, st.sampled_from([170, 256])),
            "steps",
            broken,
        )
    )
    long_path = 12 < request.steps <= 256
    if "properties" in broken:
        count = draw(st.sampled_from([0, 33]))  # none, or over the limit of 32
    else:
        count = draw(st.integers(1, 1 if long_path else 3))
    if count == 33:
        request.properties.extend(
            pb.Property(name=f"p{i}", editor={"model": "procedural"}) for i in range(33)
        )
    else:
        request.properties.extend(
            draw(properties(f"p{i}", image, broken, request.steps or 10)) for i in range(count)
        )
    # a provided path needs samples = 1
    single = long_path or any(p.HasField("provided_path") for p in request.properties)
    request.samples = draw(
        wild_or(
            st.integers(0, 1 if single else 2),
            st.one_of(st.integers(2, 2**32 - 1), UINT32_EDGES),
            "samples",
            broken,
        )
    )
    request.permutations = draw(
        wild_or(
            st.one_of(st.just(0), st.integers(100, 1000)),
            st.one_of(st.integers(1, 99), st.integers(100_001, 2**32 - 1), UINT32_EDGES),
            "permutations",
            broken,
        )
    )
    request.alpha = draw(
        wild_or(st.one_of(st.just(0.0), st.floats(0.01, 0.5)), DOUBLES, "alpha", broken)
    )
    if draw(st.booleans()):
        request.min_probability_change = draw(
            wild_or(st.floats(0, 1), DOUBLES, "min_probability_change", broken)
        )
    return request


# ----------------------------------------------------------------------------- wire level


def varint(value: int) -> bytes:
    """A protobuf varint; negative values as the 10-byte two's complement."""
    value &= 2**64 - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def length_delimited(field: int, payload: bytes) -> bytes:
    return key(field, 2) + varint(len(payload)) + payload


INVALID_UTF8 = st.builds(
    lambda bad, before, after: before + bad + after,
    st.sampled_from(
        [
            b"\xff",
            b"\x80",
            b"\xc0\xaf",  # overlong
            b"\xed\xa0\x80",  # a surrogate
            b"\xf4\x90\x80\x80",  # above U+10FFFF
            b"\xe2\x82",  # cut short
            b"\xfe\xfe\xff\xff",
        ]
    ),
    st.text(st.characters(max_codepoint=127), max_size=8).map(str.encode),
    st.binary(max_size=8),
)


def in_string_field(path: str, text: bytes) -> bytes:
    """`text` as the string at `path`, appended to a request (merging into model and
    adding a property where the path goes through them)."""
    if path == "request_id":
        return length_delimited(1, text)
    if path.startswith("model."):
        field = {"name": 1, "version": 2, "output": 3}[path.split(".")[1]]
        return length_delimited(3, length_delimited(field, text))
    editor_model = length_delimited(1, b"procedural")
    if path == "property.name":
        return length_delimited(4, length_delimited(1, text) + length_delimited(2, editor_model))
    if path == "parameter.key":
        entry = length_delimited(1, text) + length_delimited(2, b"hue")
    elif path == "parameter.value":
        entry = length_delimited(1, b"operation") + length_delimited(2, text)
    else:  # editor.model / editor.version
        field = 1 if path == "editor.model" else 2
        editor = length_delimited(field, text)
        return length_delimited(4, length_delimited(1, b"bad") + length_delimited(2, editor))
    editor = editor_model + length_delimited(3, entry)
    return length_delimited(4, length_delimited(1, b"bad") + length_delimited(2, editor))


STRING_PATHS = st.sampled_from(
    [
        "request_id",
        "model.name",
        "model.version",
        "model.output",
        "property.name",
        "editor.model",
        "editor.version",
        "parameter.key",
        "parameter.value",
    ]
)
NEGATIVE = st.one_of(st.integers(-(2**31), -1), st.just(-(2**63)))


@st.composite
def wire_requests(draw: st.DrawFn) -> bytes:
    """Serialized requests the protobuf library would not build, and plain garbage."""
    base = draw(st.one_of(st.just(known_good()), explain_requests())).SerializeToString()
    kind = draw(
        st.sampled_from(
            [
                "non_utf8",
                "non_utf8",
                "negative",
                "wrong_wire_type",
                "raw_double",
                "packed_floats",
                "truncated",
                "flipped",
                "garbage",
                "huge_length",
                "deep_groups",
                "unknown_field",
            ]
        )
    )
    if kind == "non_utf8":
        return base + in_string_field(draw(STRING_PATHS), draw(INVALID_UTF8))
    if kind == "negative":
        where = draw(st.sampled_from(["steps", "samples", "seed", "permutations", "target"]))
        number = varint(draw(NEGATIVE))
        if where == "target":
            return base + length_delimited(3, key(4, 0) + number)
        field = {"steps": 5, "samples": 6, "seed": 7, "permutations": 8}[where]
        return base + key(field, 0) + number
    if kind == "wrong_wire_type":
        field = draw(st.integers(1, 11))
        wire_type = draw(st.sampled_from([0, 1, 2, 5]))
        payload = {
            0: varint(draw(UINT64)),
            1: draw(st.binary(min_size=8, max_size=8)),
            2: varint(3) + b"abc",
            5: draw(st.binary(min_size=4, max_size=4)),
        }[wire_type]
        return base + key(field, wire_type) + payload
    if kind == "raw_double":  # any 64-bit pattern (NaN payloads, denormals) as alpha or min change
        return (
            base + key(draw(st.sampled_from([9, 11])), 1) + draw(st.binary(min_size=8, max_size=8))
        )
    if kind == "packed_floats":  # preprocessing.mean / std with any length, even not 4k
        packed = length_delimited(draw(st.sampled_from([1, 2])), draw(st.binary(max_size=20)))
        return base + length_delimited(3, length_delimited(6, packed))
    if kind == "truncated":
        return base[: draw(st.integers(0, max(0, len(base) - 1)))]
    if kind == "flipped":
        return draw(damaged(base)) if base else b"\xff"
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=256))
    if kind == "huge_length":  # a length prefix far beyond the message
        return base + key(draw(st.integers(1, 11)), 2) + varint(2**31) + b"\0" * 8
    if kind == "deep_groups":  # start-group tags nested past any recursion limit
        return base + key(1000, 3) * draw(st.integers(50, 5000))
    return base + length_delimited(draw(st.integers(12, 2**29 - 1)), draw(st.binary(max_size=32)))


# ----------------------------------------------------------------------------- checks


def known_good(**overrides: object) -> pb.ExplainRequest:
    request = pb.ExplainRequest(
        image=scene_png(),
        model=pb.ModelRef(name="synth_hue", predicted_class=True),
        properties=[
            pb.Property(
                name="hue",
                editor=pb.EditorIntervention(
                    model="procedural", parameters={"operation": "hue", "region": "object"}
                ),
            )
        ],
        steps=6,
        permutations=200,
    )
    for name, value in overrides.items():
        if isinstance(value, pb.ModelRef):
            request.model.CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


@pytest.fixture(scope="module")
def fuzz_channel(live_stack):
    """A channel to the session's gateway that reads any status message, however long, so
    that check_outcome sees the server's own status (a default channel drops trailers over
    8-16 KiB and reports RESOURCE_EXHAUSTED instead)."""
    options = [("grpc.max_metadata_size", 4 * 1024 * 1024)]
    with grpc.insecure_channel(live_stack.gateway, options=options) as channel:
        yield channel


def explain_raw(channel: grpc.Channel, data: bytes) -> tuple[grpc.StatusCode, str, list]:
    """Send `data` as an Explain request; the final status, its details and the events."""
    call = channel.unary_stream(
        METHOD,
        request_serializer=lambda raw: raw,
        response_deserializer=pb.ExplainEvent.FromString,
    )
    events: list[pb.ExplainEvent] = []
    try:
        for event in call(data, timeout=DEADLINE_S):
            events.append(event)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", events
    return grpc.StatusCode.OK, "", events


def check_outcome(code: grpc.StatusCode, details: str, events: list, properties: int | None):
    """The call ended in a proper status; a stream that succeeded is complete."""
    assert code not in FORBIDDEN, f"{code.name}: {details[:500]}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{code.name} without a message"
        # A client with gRPC's default limits (8 KiB of trailers) must be able to read it.
        assert len(details.encode()) <= MAX_DETAILS_BYTES, (
            f"{code.name} with a {len(details.encode())}-byte message: {details[:200]}"
        )
        return
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "accepted" and kinds[-1] == "done", kinds
    results = [
        event.property_result
        for event in events
        if "property_result" in event.DESCRIPTOR.fields_by_name
        and event.HasField("property_result")
    ]
    if properties is not None:
        assert len(results) == properties
    for result in results:
        status = result.status
        assert status.code not in FORBIDDEN_PROPERTY_CODES, (
            f"property {result.property_name[:80]!r}: "
            f"{code_pb2.Code.Name(status.code)}: {status.message[:500]}"
        )
        if status.code != code_pb2.OK:
            assert status.message.strip()


def assert_still_serving(channel: grpc.Channel, live_stack) -> None:
    """The gateway process lives, answers its health check and explains a small request."""
    os.kill(live_stack.pids["gateway"], 0)  # raises ProcessLookupError once it is gone
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    code, details, events = explain_raw(channel, known_good().SerializeToString())
    assert code == grpc.StatusCode.OK, f"{code.name}: {details}"
    check_outcome(code, details, events, properties=1)


# ----------------------------------------------------------------------------- tests


@FUZZ_SETTINGS
@given(request=explain_requests())
def test_any_request_message_ends_in_a_status(fuzz_channel, live_stack, request):
    code, details, events = explain_raw(fuzz_channel, request.SerializeToString())
    check_outcome(code, details, events, properties=len(request.properties))
    assert_still_serving(fuzz_channel, live_stack)


@WIRE_SETTINGS
@given(data=wire_requests())
def test_any_request_bytes_end_in_a_status(fuzz_channel, live_stack, data):
    code, details, events = explain_raw(fuzz_channel, data)
    check_outcome(code, details, events, properties=None)
    assert_still_serving(fuzz_channel, live_stack)


def _with(request: pb.ExplainRequest, edit) -> pb.ExplainRequest:
    edit(request)
    return request


def _blend(request: pb.ExplainRequest) -> None:
    request.image = png(np.zeros((1, 40, 3), dtype=np.uint8))
    request.properties[0].editor.parameters["operation"] = "blend"


def _tiny_std(request: pb.ExplainRequest) -> None:
    request.model.name = "synth_hue_fp32"
    request.model.preprocessing.std.extend([1e-38] * 3)


# What fuzzing found, kept as regression cases: each one failed when it was found and
# was fixed in the gateway (the comments say what it used to do).
FINDINGS = {
    # Bytes that do not parse as an ExplainRequest (here a request_id that is not UTF-8)
    # end in UNKNOWN "Unexpected <class 'DecodeError'>" from grpc.aio, not INVALID_ARGUMENT.
    "non_utf8_request_id": known_good().SerializeToString() + b"\x0a\x02\xff\xfe",
    "garbage_bytes": b"\xff\xff\xff",
    # The procedural editor's blend on an image 1 pixel high or wide: a broadcast
    # ValueError in the editor, reported as the property's INTERNAL status.
    "blend_on_a_1_pixel_high_image": _with(known_good(), _blend).SerializeToString(),
    # A model or editor version that is not a positive integer: Triton's refusal is
    # passed on as INTERNAL.
    "model_version_not_a_number": known_good(
        model=pb.ModelRef(name="synth_hue", version="x")
    ).SerializeToString(),
    "editor_version_not_a_number": _with(
        known_good(), lambda r: setattr(r.properties[0].editor, "version", "-1")
    ).SerializeToString(),
    # steps >= 170 (documented range 2..256): math.factorial(171) overflows a float in
    # convert.check_reachable, OverflowError -> INTERNAL "internal error".
    "steps_170": known_good(steps=170).SerializeToString(),
    # A finite but tiny std makes the FP32 input infinite; the model's non-finite output
    # is the property's INTERNAL status although the caller chose the preprocessing.
    "tiny_preprocessing_std": _with(known_good(), _tiny_std).SerializeToString(),
    # The NOT_FOUND message echoes the whole 20000-character model name: a default client
    # cannot read trailers that large and sees RESOURCE_EXHAUSTED "Stream removed".
    "long_model_name": known_good(model=pb.ModelRef(name="m" * 20_000)).SerializeToString(),
}


@pytest.mark.parametrize("data", list(FINDINGS.values()), ids=list(FINDINGS))
def test_fuzzing_findings_end_in_a_proper_status(fuzz_channel, live_stack, data):
    code, details, events = explain_raw(fuzz_channel, data)
    check_outcome(code, details, events, properties=None)
    assert_still_serving(fuzz_channel, live_stack)


def test_the_service_still_serves_after_fuzzing(channel, live_stack):
    assert_still_serving(channel, live_stack)


def _main_image_sized_like(frame: bytes) -> bytes:
    """A plain image of the size `frame` declares (16 x 16 when it declares none or a large
    one), so that a mutated path image is decoded rather than refused for its size."""
    try:
        with Image.open(io.BytesIO(frame)) as image:
            width, height = image.size
    except Exception:  # a damaged header: any size will do
        width, height = 16, 16
    if not (1 <= width <= 64 and 1 <= height <= 64):
        width, height = 16, 16
    return encode(np.full((height, width, 3), 128, dtype=np.uint8))


def test_mutated_images_end_in_invalid_argument_or_a_result(fuzz_channel, live_stack):
    """Issue 15: structure-aware PNG/JPEG mutants (tests/image_mutation.py) as the image and,
    one in four, as a provided path's images: never INTERNAL or UNKNOWN. Valid mutants stay
    cheap (2 steps, a fixed path, one property, procedural editor, synthetic classifier)."""

    def request(image: bytes, path: list[bytes] | None = None) -> bytes:
        prop = pb.Property(name="hue")
        if path is None:
            prop.editor.CopyFrom(
                pb.EditorIntervention(model="procedural", parameters={"operation": "hue"})
            )
        else:
            prop.provided_path.images.extend(path)
        message = pb.ExplainRequest(
            image=image,
            model=pb.ModelRef(name="synth_hue", predicted_class=True),
            properties=[prop],
            steps=2,
            permutations=100,
            alpha=0.5,
            path_mode=pb.PATH_MODE_FIXED,
        )
        return message.SerializeToString()

    codes: dict[str, int] = {}
    for index in range(200):
        data = mutant(index)
        as_path = index % 4 == 3
        sent = request(_main_image_sized_like(data), [data, data]) if as_path else request(data)
        code, details, events = explain_raw(fuzz_channel, sent)
        try:
            check_outcome(code, details, events, properties=1)
        except AssertionError as failure:
            where = "path images" if as_path else "image"
            raise AssertionError(f"mutant({index}) as the {where}: {failure}") from None
        codes[code.name] = codes.get(code.name, 0) + 1
    print(f"\n200 mutated images through the gateway: {codes}")

    broken = broken_second_idat_png()  # Pillow's SyntaxError, once INTERNAL
    code, details, _ = explain_raw(fuzz_channel, request(broken))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert details.startswith("image could not be decoded"), details
    code, details, _ = explain_raw(
        fuzz_channel, request(encode(np.zeros((16, 16, 3), np.uint8)), [broken] * 2)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert "provided_path image 0 could not be decoded" in details, details
    assert_still_serving(fuzz_channel, live_stack)


# ----------------------------------------------------------------------------- BuildGraph

GRAPH_METHOD = "/propscope.v1.CausalGraphService/BuildGraph"
GRAPH_FIELDS = (
    "images",
    "model.name",
    "model.version",
    "model.output",
    "model.target",
    "layers",
    "steps",
    "baseline",
    "reference_images",
    "alpha",
    "permutations",
    "min_probability_change",
    "nodes_per_layer",
    "max_edges",
    "min_share",
    "bootstrap",
    "repair_property",
    "repair_max_share",
)
# What a graph request may name besides a classifier's scores: the open model's optional
# outputs (the synthetic classifiers declare them after LOGITS).
OPEN_OUTPUTS = ("CHANNEL_MEANS", "ACTIVATIONS", "INPUT_GRADIENT", "GRAD_X_ACTIVATION")


@st.composite
def graph_requests(draw: st.DrawFn) -> gpb.BuildGraphRequest:
    """Random values for every field of BuildGraphRequest, a few broken at a time. A valid
    one stays cheap: one or two small images, one layer (features.0's 16 channels,
    pre-screened down to 1..2 nodes), 7..8 steps, one edge, a few hundred permutations."""
    broken = draw(st.sets(st.sampled_from(GRAPH_FIELDS), max_size=3))
    image = draw(pixels())
    valid_image = st.one_of(st.just(png(image)), encoded(image, valid=True))
    images = draw(
        wild_or(
            st.lists(valid_image, min_size=1, max_size=2),
            st.one_of(
                st.just([]),
                st.lists(st.one_of(encoded(image), hostile_images()), min_size=1, max_size=2),
                st.just([png(image)] * 65),  # over max_graph_images
            ),
            "images",
            broken,
        )
    )
    model = draw(model_refs(broken))
    if "model.output" in broken and draw(st.booleans()):
        model.output = draw(st.sampled_from(OPEN_OUTPUTS))
    request = gpb.BuildGraphRequest(
        request_id=draw(TEXT), images=images, model=model, seed=draw(UINT64)
    )
    request.layers.extend(
        draw(
            wild_or(
                st.just(["features.0"]),
                st.lists(
                    st.one_of(st.sampled_from(["features.0", "features.9", "", "features"]), TEXT),
                    max_size=3,
                ),
                "layers",
                broken,
            )
        )
    )
    request.steps = draw(
        wild_or(st.integers(7, 8), st.one_of(st.integers(0, 6), UINT32_EDGES), "steps", broken)
    )
    request.baseline = draw(
        wild_or(
            st.sampled_from([0, 1, 2]),
            st.sampled_from([3, 2**31 - 1, -1, -(2**31)]),
            "baseline",
            broken,
        )
    )
    if "reference_images" in broken:
        count = draw(st.sampled_from([1, 7, 8, 257]))
        reference = draw(st.one_of(st.just(png(image)), hostile_images()))
        request.reference_images.extend([reference] * count)
    request.alpha = draw(
        wild_or(st.one_of(st.just(0.0), st.floats(0.05, 0.5)), DOUBLES, "alpha", broken)
    )
    request.permutations = draw(
        wild_or(
            st.integers(100, 300),
            st.one_of(st.just(0), st.integers(1, 99), UINT32_EDGES),
            "permutations",
            broken,
        )
    )
    for name in ("min_probability_change", "min_share"):
        if draw(st.booleans()):
            setattr(request, name, draw(wild_or(st.floats(0.01, 1), DOUBLES, name, broken)))
    for name, low, high in (("nodes_per_layer", 1, 2), ("max_edges", 1, 1), ("bootstrap", 1, 50)):
        setattr(
            request,
            name,
            draw(
                wild_or(st.integers(low, high), st.one_of(st.just(0), UINT32_EDGES), name, broken)
            ),
        )
    if draw(st.integers(0, 3)) == 0 or "repair_property" in broken:
        request.repair_property.CopyFrom(
            draw(properties("repair", image, broken | {"property.source"}, request.steps))
        )
        if "repair_property" in broken and draw(st.booleans()):
            request.repair_property.region.box.right = 0.5
    if "repair_max_share" in broken or draw(st.booleans()):
        request.repair_max_share = draw(
            wild_or(st.floats(0.01, 0.5), DOUBLES, "repair_max_share", broken)
        )
    return request


def graph_raw(channel: grpc.Channel, data: bytes) -> tuple[grpc.StatusCode, str, list]:
    """Send `data` as a BuildGraph request; the final status, its details and the events."""
    call = channel.unary_stream(
        GRAPH_METHOD,
        request_serializer=lambda raw: raw,
        response_deserializer=gpb.BuildGraphEvent.FromString,
    )
    events: list[gpb.BuildGraphEvent] = []
    try:
        for event in call(data, timeout=DEADLINE_S):
            events.append(event)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", events
    return grpc.StatusCode.OK, "", events


@settings(FUZZ_SETTINGS, max_examples=60)
@given(request=graph_requests())
def test_any_graph_request_ends_in_a_status(fuzz_channel, live_stack, request):
    code, details, events = graph_raw(fuzz_channel, request.SerializeToString())
    check_outcome(code, details, events, properties=None)
    assert_still_serving(fuzz_channel, live_stack)


# What fuzzing BuildGraph found, kept as regression cases: an open model's optional output
# named as the classifier's scores (ACTIVATIONS, gradients: INTERNAL from the model;
# CHANNEL_MEANS: 112 channel means graphed as classes).
@pytest.mark.parametrize("output", OPEN_OUTPUTS)
def test_graph_fuzzing_findings_end_in_a_proper_status(fuzz_channel, live_stack, output):
    request = graph_known_good()
    request.model.output = output
    code, details, _ = graph_raw(fuzz_channel, request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert "model.output" in details


def graph_known_good() -> gpb.BuildGraphRequest:
    return gpb.BuildGraphRequest(
        images=[scene_png()],
        model=pb.ModelRef(name="synth_hue"),
        layers=["features.0"],
        steps=7,
        nodes_per_layer=1,
        max_edges=1,
        permutations=200,
    )


@st.composite
def graph_wire_requests(draw: st.DrawFn) -> bytes:
    """BuildGraph bytes the protobuf library would not build: non-UTF-8 strings, negative
    varints in the counts and the baseline enum, truncated, flipped and garbage."""
    base = graph_known_good().SerializeToString()
    kind = draw(st.sampled_from(["non_utf8", "negative", "truncated", "flipped", "garbage"]))
    if kind == "non_utf8":  # request_id (1) or a layer name (4)
        return base + length_delimited(draw(st.sampled_from([1, 4])), draw(INVALID_UTF8))
    if kind == "negative":  # steps, baseline, permutations, nodes_per_layer, max_edges, bootstrap
        field = draw(st.sampled_from([5, 6, 9, 11, 12, 14, 15]))
        return base + key(field, 0) + varint(draw(NEGATIVE))
    if kind == "truncated":
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flipped":
        return draw(damaged(base))
    return draw(st.binary(min_size=1, max_size=256))


@settings(WIRE_SETTINGS, max_examples=30)
@given(data=graph_wire_requests())
def test_any_graph_request_bytes_end_in_a_status(fuzz_channel, live_stack, data):
    code, details, events = graph_raw(fuzz_channel, data)
    check_outcome(code, details, events, properties=None)
    assert_still_serving(fuzz_channel, live_stack)


def test_a_graph_of_an_unknown_model_is_not_found_not_over_the_memory_budget(fuzz_channel):
    # Its memory estimate once assumed an unbounded batch: RESOURCE_EXHAUSTED, 360 TB.
    request = graph_known_good()
    request.model.name = "no_such_model"
    code, details, _ = graph_raw(fuzz_channel, request.SerializeToString())
    assert code == grpc.StatusCode.NOT_FOUND, f"{code.name}: {details}"
    assert "no_such_model" in details
