/**
 * Turning the caller's image into the PNG or JPEG bytes the contract wants, with the Python
 * SDK's conversions (client/propscope/_images.py): PNG and JPEG are sent unchanged, other
 * formats (WebP, GIF, TIFF, AVIF through sharp; BMP through bmp-ts) become PNG.
 */

import { readFile } from "node:fs/promises";

import { decode as decodeBmp } from "bmp-ts";
import sharp from "sharp";

/** Encoded image bytes, or the path of an image file. */
export type ImageInput = Uint8Array | string;

/** The files a provided-path folder contributes (as the Python SDK's); others are left out. */
export const FOLDER_IMAGE_SUFFIXES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"];
export const READABLE_FORMATS = "PNG, JPEG, WebP, GIF, TIFF, AVIF or BMP";

const PNG_MAGIC = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
const JPEG_MAGIC = Buffer.from([0xff, 0xd8, 0xff]);
const BMP_MAGIC = Buffer.from("BM");

/**
 * The PNG or JPEG bytes to send for `image`. PNG and JPEG are sent unchanged; other formats
 * become an RGB PNG, any alpha channel dropped (as Pillow's `convert("RGB")`, not blended).
 * The service reads RGB only: an image with transparent pixels emits a process warning
 * (code `PROPSCOPE_ALPHA_DROPPED`, as the Python SDK's AlphaDroppedWarning). Rejects with an
 * Error naming the file when it cannot be read or is no image.
 */
export async function encodeImage(image: ImageInput): Promise<Buffer> {
  const [data, what] = await loaded(image, "image");
  const encoded = isPngOrJpeg(data) ? data : await convert(data, what, rgbPng);
  if (!startsWith(data, JPEG_MAGIC) && (await hasTransparentPixels(data))) {
    process.emitWarning(
      `${what} has transparent pixels; the alpha channel is dropped, not blended: the model ` +
        "sees the colour stored under each transparent pixel (often black). Flatten the image " +
        "onto the background you mean first",
      { type: "AlphaDroppedWarning", code: ALPHA_DROPPED },
    );
  }
  return encoded;
}

/** The code of the process warning `encodeImage` emits for an image with transparent pixels. */
export const ALPHA_DROPPED = "PROPSCOPE_ALPHA_DROPPED";

/** Whether sharp decodes `data` to an image with a pixel that is not fully opaque; false when
 * it cannot decode it (PNG bytes are sent as they are: the service names what is wrong). */
async function hasTransparentPixels(data: Buffer): Promise<boolean> {
  try {
    const pixels = sharp(data);
    if (!(await pixels.metadata()).hasAlpha) return false;
    const { channels } = await pixels.stats();
    return channels[channels.length - 1].min < 255;
  } catch {
    return false;
  }
}

/**
 * The PNG or JPEG bytes to send for a region mask. PNG and JPEG are sent unchanged; other
 * formats become PNG keeping their alpha channel when they have one (the service reads the
 * alpha channel when there is one, else the grey level), else grey with Pillow's weights.
 */
export async function encodeMask(mask: ImageInput): Promise<Buffer> {
  const [data, what] = await loaded(mask, "mask");
  return isPngOrJpeg(data) ? data : convert(data, what, maskPng);
}

async function loaded(image: ImageInput, kind: string): Promise<[Buffer, string]> {
  if (typeof image !== "string") {
    // A view, not a copy: an image may be tens of megabytes.
    return [Buffer.from(image.buffer, image.byteOffset, image.byteLength), `${kind} bytes`];
  }
  try {
    return [await readFile(image), `${kind} '${image}'`];
  } catch (error) {
    throw new Error(`cannot read ${kind} '${image}': ${(error as Error).message}`);
  }
}

function isPngOrJpeg(data: Buffer): boolean {
  return startsWith(data, PNG_MAGIC) || startsWith(data, JPEG_MAGIC);
}

function startsWith(data: Buffer, magic: Buffer): boolean {
  return data.subarray(0, magic.length).equals(magic);
}

/** Decoded pixels and whether the format carries an alpha channel (Pillow's mode has "A"). */
interface Decoded {
  pixels: sharp.Sharp;
  hasAlpha: boolean;
}

async function convert(
  data: Buffer,
  what: string,
  encode: (decoded: Decoded) => Promise<Buffer>,
): Promise<Buffer> {
  if (!data.length) throw new Error(`${what} is empty`);
  try {
    return await encode(await decode(data));
  } catch (error) {
    throw new Error(`${what} is not an image the client can read (${READABLE_FORMATS}): ${(error as Error).message}`);
  }
}

async function decode(data: Buffer): Promise<Decoded> {
  if (startsWith(data, BMP_MAGIC)) {
    // bmp-ts gives ABGR at every bit depth (its toRGBA option skips palette images). Read as
    // opaque, as Pillow reads all but rare 32-bit alpha-bitfield BMPs.
    const { width, height, data: abgr } = decodeBmp(data);
    const rgb = Buffer.alloc(width * height * 3);
    for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
      rgb[i] = abgr[j + 3];
      rgb[i + 1] = abgr[j + 2];
      rgb[i + 2] = abgr[j + 1];
    }
    return { pixels: sharp(rgb, { raw: { width, height, channels: 3 } }), hasAlpha: false };
  }
  const pixels = sharp(data);
  const { hasAlpha } = await pixels.metadata();
  return { pixels, hasAlpha };
}

async function rgbPng({ pixels }: Decoded): Promise<Buffer> {
  return pixels.removeAlpha().toColourspace("srgb").png().toBuffer();
}

async function maskPng({ pixels, hasAlpha }: Decoded): Promise<Buffer> {
  if (hasAlpha) return pixels.toColourspace("srgb").ensureAlpha().png().toBuffer();
  const { data, info } = await pixels
    .removeAlpha()
    .toColourspace("srgb")
    .raw()
    .toBuffer({ resolveWithObject: true });
  // Pillow's RGB to L: ITU-R 601-2 luma in 16-bit fixed point, rounded.
  const grey = Buffer.alloc(info.width * info.height);
  for (let i = 0, j = 0; i < grey.length; i++, j += info.channels) {
    grey[i] = (data[j] * 19595 + data[j + 1] * 38470 + data[j + 2] * 7471 + 0x8000) >> 16;
  }
  return sharp(grey, { raw: { width: info.width, height: info.height, channels: 1 } })
    .toColourspace("b-w")
    .png()
    .toBuffer();
}
