"""The TypeScript/Node client against the session's stack: its own tests (client/node/test/),
its image conversions pixel for pixel against the Python SDK's, and the package as a TypeScript
team gets it: `npm pack`, installed offline into a fresh project, one real call, a tsc check."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from propscope._images import encode_image, encode_mask

REPOSITORY = Path(__file__).resolve().parents[2]
NODE_CLIENT = REPOSITORY / "client" / "node"
SAMPLE = REPOSITORY / "docs" / "sample.png"
HUE = "object_hue=procedural:operation=hue,region=object"

# A consumer of the packed client: one Explain call on a WebP image (converted by the installed
# package's sharp) through the package's ES module entry, printing the property's result.
CONSUMER_CALL = """\
import { buildExplainRequest, createClient } from "propscope-client";

const [target, image, property] = process.argv.slice(2);
const client = createClient(target);
try {
  const request = await buildExplainRequest({ image, model: "synth_hue", properties: [property], steps: 6, seed: 7 });
  for await (const event of client.explain(request, { deadline: Date.now() + 120_000 })) {
    if (event.event === "propertyResult") {
      const { propertyName, status, score, relevant } = event.propertyResult;
      console.log(JSON.stringify({ propertyName, code: status?.code, score, relevant }));
    }
  }
} finally {
  client.close();
}
"""

# Type-checked, never run: the package's declarations must type the events and refuse a
# wrong option (tsc fails on an unused @ts-expect-error, so `any` types cannot pass).
CONSUMER_TYPES = """\
import { buildExplainRequest, createClient, encodeImage, PropscopeError, type PropertyResult } from "propscope-client";

export async function firstScore(target: string): Promise<number | undefined> {
  const client = createClient(target, { token: "secret" });
  const request = await buildExplainRequest({ image: await encodeImage("cat.webp"), model: "m", properties: ["a=ed"] });
  for await (const event of client.explain(request)) {
    if (event.event === "propertyResult") {
      const result: PropertyResult = event.propertyResult;
      return result.score;
    }
  }
  return undefined;
}

export function codeName(error: unknown): string | undefined {
  return error instanceof PropscopeError ? error.codeName : undefined;
}

// @ts-expect-error steps is a number
void buildExplainRequest({ image: "x.png", model: "m", properties: ["a=ed"], steps: "10" });
"""

CONSUMER_TSCONFIG = {
    "compilerOptions": {
        "module": "nodenext",
        "moduleResolution": "nodenext",
        "target": "ES2022",
        "strict": True,
        "noEmit": True,
        "types": ["node"],
    },
    "files": ["check.ts"],
}

# Encodes each file with the client's encodeImage and encodeMask into OUT/<name>.image.png and
# OUT/<name>.mask.png.
CONVERT = """\
const { writeFileSync } = require("node:fs");
const path = require("node:path");
const { encodeImage, encodeMask } = require(process.argv[1]);
(async () => {
  const [out, ...files] = process.argv.slice(2);
  for (const file of files) {
    const name = path.join(out, path.basename(file));
    writeFileSync(`${name}.image.png`, await encodeImage(file));
    writeFileSync(`${name}.mask.png`, await encodeMask(file));
  }
})();
"""


def _run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    finished = subprocess.run(command, cwd=cwd, capture_output=True, text=True, **kwargs)
    assert finished.returncode == 0, (
        f"{' '.join(command)} failed:\n{finished.stdout}\n{finished.stderr}"
    )
    return finished


def test_the_node_client_passes_its_tests_against_the_live_service(live_stack, npm):
    _run(
        ["node", "--test", "dist/test/"],
        NODE_CLIENT,
        env={**os.environ, "PROPSCOPE_TARGET": live_stack.gateway},
        timeout=300,
    )


# The alpha images are meant: the SDK's warning that it drops their alpha is tested elsewhere.
@pytest.mark.filterwarnings("ignore::propscope._images.AlphaDroppedWarning")
def test_the_node_client_converts_images_as_the_python_sdk_does(npm, tmp_path):
    """Pillow writes each format; Node's PNG must hold Pillow's pixels in Pillow's mode."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgb, grey = Image.fromarray(rgba[..., :3]), Image.fromarray(rgba[..., 0])
    files = {
        "rgba.webp": (Image.fromarray(rgba), {"lossless": True}),
        "rgb.webp": (rgb, {"lossless": True}),
        "grey.webp": (grey, {"lossless": True}),
        "rgb.bmp": (rgb, {}),
        "grey.bmp": (grey, {}),
        "palette.bmp": (rgb.quantize(16), {}),
        "palette.gif": (rgb.quantize(16), {}),
        "rgba.tiff": (Image.fromarray(rgba), {}),
        "grey-alpha.tiff": (Image.fromarray(rgba[..., :2], "LA"), {}),
    }
    for name, (image, options) in files.items():
        image.save(tmp_path / name, **options)
    out = tmp_path / "out"
    out.mkdir()
    paths = [str(tmp_path / name) for name in files]
    _run(["node", "-e", CONVERT, str(NODE_CLIENT / "dist" / "src"), str(out), *paths], tmp_path)

    for name in files:
        for kind, encode in (("image", encode_image), ("mask", encode_mask)):
            with Image.open(io.BytesIO(encode(tmp_path / name))) as python:
                expected = (python.mode, np.asarray(python))
            with Image.open(out / f"{name}.{kind}.png") as node:
                assert node.format == "PNG"
                assert node.mode == expected[0], f"{name} as {kind}"
                np.testing.assert_array_equal(np.asarray(node), expected[1], f"{name} as {kind}")


def test_the_packed_client_installs_offline_and_calls_the_live_service(live_stack, npm, tmp_path):
    """`npm pack`, then a fresh project installs the tarball with no registry (its dependencies
    from npm's cache, which `make setup`'s `npm ci` filled): a plain .mjs makes a real call and
    tsc checks a .ts consumer against the package's declarations."""
    packed = _run(
        [npm, "pack", "--ignore-scripts", "--json", "--pack-destination", str(tmp_path)],
        NODE_CLIENT,
        timeout=120,
    )
    [package] = json.loads(packed.stdout)
    shipped = {entry["path"] for entry in package["files"]}
    assert {"package.json", "dist/src/index.js", "dist/src/index.d.ts"} <= shipped
    assert not [path for path in shipped if path.endswith(".proto") or "test" in path.split("/")]

    consumer = tmp_path / "consumer"
    consumer.mkdir()
    _write_consumer(npm, consumer, tmp_path / package["filename"])
    _run(
        [npm, "ci", "--offline", "--no-audit", "--no-fund", "--ignore-scripts"],
        consumer,
        timeout=180,
    )

    image = consumer / "sample.webp"
    Image.open(SAMPLE).save(image, lossless=True)
    called = _run(["node", "call.mjs", live_stack.gateway, str(image), HUE], consumer, timeout=180)
    result = json.loads(called.stdout)
    assert result["propertyName"] == "object_hue" and result["code"] == 0, result
    # The hue-biased model follows the object's hue, as in client/node/test/service.test.ts.
    assert result["relevant"] is True and result["score"] > 0, result

    _run([str(consumer / "node_modules" / ".bin" / "tsc"), "-p", "."], consumer, timeout=120)


def _write_consumer(npm: str, consumer: Path, tarball: Path) -> None:
    """A project depending on the tarball, with a lockfile so that `npm ci --offline` needs no
    registry: the client's own lock entries for what the package and tsc need."""
    shutil.copy(tarball, consumer)
    client = json.loads((NODE_CLIENT / "package.json").read_text())
    locked = json.loads((NODE_CLIENT / "package-lock.json").read_text())["packages"]
    dependency = f"file:{tarball.name}"
    tools = {name: client["devDependencies"][name] for name in ("typescript", "@types/node")}
    manifest = {
        "name": "consumer",
        "version": "1.0.0",
        "private": True,
        "dependencies": {client["name"]: dependency},
        "devDependencies": tools,
    }
    packages = {
        "": {key: manifest[key] for key in ("name", "version", "dependencies", "devDependencies")},
        f"node_modules/{client['name']}": {
            "version": client["version"],
            "resolved": dependency,
            "dependencies": client["dependencies"],
        },
    }
    registry = _run([npm, "config", "get", "registry"], consumer).stdout.strip().rstrip("/")
    wanted = [*client["dependencies"], *tools]
    while wanted:
        key = f"node_modules/{wanted.pop()}"
        if key in packages or key not in locked:
            continue
        name = key.removeprefix("node_modules/")
        # The tarball's address: with it and the integrity npm takes the tarball from its cache
        # and needs no package metadata (the client's lock may omit it: omit-lockfile-registry-resolved).
        tarball_url = f"{registry}/{name}/-/{name.rpartition('/')[2]}-{locked[key]['version']}.tgz"
        packages[key] = {"resolved": tarball_url, **locked[key]}
        for field in ("dependencies", "optionalDependencies", "peerDependencies"):
            wanted.extend(locked[key].get(field, {}))
    lock = {"name": "consumer", "lockfileVersion": 3, "requires": True, "packages": packages}
    (consumer / "package.json").write_text(json.dumps(manifest, indent=2))
    (consumer / "package-lock.json").write_text(json.dumps(lock, indent=2))
    (consumer / "tsconfig.json").write_text(json.dumps(CONSUMER_TSCONFIG, indent=2))
    (consumer / "call.mjs").write_text(CONSUMER_CALL)
    (consumer / "check.ts").write_text(CONSUMER_TYPES)
