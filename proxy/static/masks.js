// Masks as the API sends them (COCO compressed RLE), and drawing them over the picture.
//
// A mask stays in run-length form: uncompressed counts, column-major, zeros first, as
// pycocotools writes them. Drawing paints each mask's runs into one label buffer (an object
// index per displayed pixel, column-major like the runs), then blends every labelled pixel
// with its object's colour in one pass, outlines included.

const GOLDEN_RATIO_CONJUGATE = 0.618033988749895;
const OPACITY = 0.5;

// Distinct colours, the hues spaced by the golden ratio as in the server's overlay picture.
export function colourOf(index) {
  const hue = (index * GOLDEN_RATIO_CONJUGATE) % 1;
  const saturation = 200 / 255;
  const sector = Math.floor(hue * 6);
  const fraction = hue * 6 - sector;
  const p = 1 - saturation;
  const q = 1 - saturation * fraction;
  const t = 1 - saturation * (1 - fraction);
  const [r, g, b] = [
    [1, t, p],
    [q, 1, p],
    [p, 1, t],
    [p, q, 1],
    [t, p, 1],
    [1, p, q],
  ][sector % 6];
  return [Math.round(r * 255), Math.round(g * 255), Math.round(b * 255)];
}

export function cssColour(index) {
  const [r, g, b] = colourOf(index);
  return `rgb(${r} ${g} ${b})`;
}

// pycocotools' rleFrString: LEB128-like 6-bit groups, counts after the second as deltas.
export function decodeRle(rle) {
  const [height, width] = rle.size;
  const text = rle.counts;
  const counts = [];
  let position = 0;
  while (position < text.length) {
    let value = 0;
    let shift = 0;
    let more = true;
    while (more) {
      const chunk = text.charCodeAt(position) - 48;
      value += (chunk & 0x1f) * 2 ** shift;
      more = (chunk & 0x20) !== 0;
      position += 1;
      shift += 5;
      if (!more && chunk & 0x10) value -= 2 ** shift; // sign-extend
    }
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return { height, width, counts: Uint32Array.from(counts) };
}

// Calls visit(column, firstRow, endRow) for every vertical segment of the mask's pixels.
export function forEachSegment(mask, visit) {
  const { height, counts } = mask;
  let position = 0;
  for (let i = 0; i < counts.length; i += 1) {
    let start = position;
    position += counts[i];
    if (i % 2 === 0) continue;
    while (start < position) {
      const column = Math.floor(start / height);
      const row = start - column * height;
      const end = Math.min(position - start, height - row) + row;
      visit(column, row, end);
      start += end - row;
    }
  }
}

// Paints `value` where the mask is set into a column-major label buffer of the displayed
// size (the image scaled by `scale`, nearest pixel).
export function paintMask(labels, display, mask, value, scale) {
  const { width: displayWidth, height: displayHeight } = display;
  forEachSegment(mask, (column, first, end) => {
    const x = Math.min(displayWidth - 1, Math.floor(column * scale));
    const top = Math.min(displayHeight, Math.floor(first * scale));
    const bottom = Math.min(displayHeight, Math.max(top + 1, Math.ceil(end * scale)));
    labels.fill(value, x * displayHeight + top, x * displayHeight + bottom);
  });
}

// Blends labelled pixels of `base` (RGBA, row-major) with their colours into `out`; pixels
// at an object's border take its full colour. labels: column-major, 0 = no object.
export function compose(base, labels, palette, display, out) {
  const { width, height } = display;
  for (let y = 0; y < height; y += 1) {
    let p = y * width * 4;
    for (let x = 0; x < width; x += 1, p += 4) {
      const at = x * height + y;
      const label = labels[at];
      if (label === 0) {
        out[p] = base[p];
        out[p + 1] = base[p + 1];
        out[p + 2] = base[p + 2];
      } else {
        const c = label * 3;
        const border =
          (x > 0 && labels[at - height] !== label) ||
          (x < width - 1 && labels[at + height] !== label) ||
          (y > 0 && labels[at - 1] !== label) ||
          (y < height - 1 && labels[at + 1] !== label);
        if (border) {
          out[p] = palette[c];
          out[p + 1] = palette[c + 1];
          out[p + 2] = palette[c + 2];
        } else {
          // Uint8ClampedArray rounds to the nearest integer.
          out[p] = base[p] * (1 - OPACITY) + palette[c] * OPACITY;
          out[p + 1] = base[p + 1] * (1 - OPACITY) + palette[c + 1] * OPACITY;
          out[p + 2] = base[p + 2] * (1 - OPACITY) + palette[c + 2] * OPACITY;
        }
      }
      out[p + 3] = 255;
    }
  }
}

// A full-resolution binary picture of the mask: white object on black, opaque.
export function maskPixels(mask) {
  const { width, height } = mask;
  const pixels = new Uint8ClampedArray(width * height * 4);
  for (let i = 3; i < pixels.length; i += 4) pixels[i] = 255;
  forEachSegment(mask, (column, first, end) => {
    for (let row = first; row < end; row += 1) {
      const p = (row * width + column) * 4;
      pixels[p] = 255;
      pixels[p + 1] = 255;
      pixels[p + 2] = 255;
    }
  });
  return new ImageData(pixels, width, height);
}
