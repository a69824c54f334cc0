// Downloads: the objects as COCO-style JSON (RLE as the API sent it) and as PNG masks.

import { maskPixels } from "./masks.js";

// COCO-style: one image, one category, an annotation per object with upstream's record
// fields (the mask in compressed RLE, area, bbox [x, y, w, h], scores) and its prompts.
export function cocoDocument(image, objects) {
  return {
    info: { description: "MobileSAM segmentation", date_created: new Date().toISOString() },
    images: [{ id: 1, file_name: image.name, width: image.width, height: image.height }],
    categories: [{ id: 1, name: "object" }],
    annotations: objects.map((object, index) => {
      const record = object.record;
      const annotation = {
        id: index + 1,
        image_id: 1,
        category_id: 1,
        segmentation: record.segmentation,
        area: record.area,
        bbox: record.bbox,
        iscrowd: 0,
        predicted_iou: record.predicted_iou,
        stability_score: record.stability_score,
      };
      if (record.point_coords) annotation.point_coords = record.point_coords;
      if (record.crop_box) annotation.crop_box = record.crop_box;
      if (object.prompt) annotation.prompt = object.prompt;
      return annotation;
    }),
  };
}

async function pngOf(mask) {
  const canvas = new OffscreenCanvas(mask.width, mask.height);
  canvas.getContext("2d").putImageData(maskPixels(mask), 0, 0);
  return new Uint8Array(await (await canvas.convertToBlob({ type: "image/png" })).arrayBuffer());
}

// One binary PNG per object (white object on black, the image's size), in a ZIP archive.
export async function masksZip(masks, onProgress) {
  const files = [];
  for (const [index, mask] of masks.entries()) {
    const name = `mask_${String(index + 1).padStart(3, "0")}.png`;
    files.push({ name, data: await pngOf(mask) });
    onProgress(index + 1, masks.length);
  }
  return zip(files);
}

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n += 1) {
    let c = n;
    for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(data) {
  let crc = 0xffffffff;
  for (let i = 0; i < data.length; i += 1) crc = CRC_TABLE[(crc ^ data[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

// A ZIP archive of stored (uncompressed: PNG already is) files.
export function zip(files) {
  const encoder = new TextEncoder();
  const parts = [];
  const directory = [];
  let offset = 0;
  const now = new Date();
  const time = (now.getHours() << 11) | (now.getMinutes() << 5) | (now.getSeconds() >> 1);
  const date = ((now.getFullYear() - 1980) << 9) | ((now.getMonth() + 1) << 5) | now.getDate();
  for (const file of files) {
    const name = encoder.encode(file.name);
    const crc = crc32(file.data);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true);
    local.setUint16(4, 20, true);
    local.setUint16(10, time, true);
    local.setUint16(12, date, true);
    local.setUint32(14, crc, true);
    local.setUint32(18, file.data.length, true);
    local.setUint32(22, file.data.length, true);
    local.setUint16(26, name.length, true);
    parts.push(local, name, file.data);
    const central = new DataView(new ArrayBuffer(46));
    central.setUint32(0, 0x02014b50, true);
    central.setUint16(4, 20, true);
    central.setUint16(6, 20, true);
    central.setUint16(12, time, true);
    central.setUint16(14, date, true);
    central.setUint32(16, crc, true);
    central.setUint32(20, file.data.length, true);
    central.setUint32(24, file.data.length, true);
    central.setUint16(28, name.length, true);
    central.setUint32(42, offset, true);
    directory.push(central, name);
    offset += 30 + name.length + file.data.length;
  }
  const size = directory.reduce((total, part) => total + part.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true);
  end.setUint16(8, files.length, true);
  end.setUint16(10, files.length, true);
  end.setUint32(12, size, true);
  end.setUint32(16, offset, true);
  return new Blob([...parts, ...directory, end], { type: "application/zip" });
}

export function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
