// The reference map's points: read from GET /map?format=binary (serving/map_format.py) as typed arrays
// straight onto the downloaded block (nothing parsed per point), and a uniform grid built once over
// them. The grid serves both drawing (the points of the visible cells, one contiguous run per row of
// cells) and hover (the nearest point among a few cells), so neither walks all points.

const MAGIC = "TSMAPBIN";
export const UNLABELLED = 0xffff;
const POINTS_PER_CELL = 16;
const PREFIX = 16; // magic, version, header length

export class MapFormatError extends Error {}

// The header of a block whose first bytes are `bytes`, or null when they do not hold all of it yet.
function readHeader(bytes) {
  if (bytes.length < PREFIX) return null;
  if (String.fromCharCode(...bytes.subarray(0, 8)) !== MAGIC) {
    throw new MapFormatError("the service's /map?format=binary answer is not a binary map");
  }
  const prefix = new DataView(bytes.buffer, bytes.byteOffset + 8, 8);
  const version = prefix.getUint32(0, true);
  if (version !== 1) throw new MapFormatError(`binary map version ${version}; this page reads version 1`);
  const headerLength = prefix.getUint32(4, true);
  if (bytes.length < PREFIX + headerLength) return null;
  return JSON.parse(new TextDecoder().decode(bytes.subarray(PREFIX, PREFIX + headerLength)));
}

function sectionEnd(section, Type) {
  return section.offset + section.length * Type.BYTES_PER_ELEMENT;
}

// The map over `buffer` (the whole block, possibly still being filled): typed arrays straight onto it.
function mapOver(buffer, header) {
  const section = {};
  for (const s of header.sections) section[s.name] = s;
  const view = (Type, s) => new Type(buffer, s.offset, s.length);
  const b = header.bounds;
  return {
    bundle: header.bundle,
    classNames: header.class_names,
    count: header.count,
    bounds: b ? { minX: b[0], minY: b[1], maxX: b[2], maxY: b[3] } : { minX: -1, minY: -1, maxX: 1, maxY: 1 },
    xs: view(Float32Array, section.x),
    ys: view(Float32Array, section.y),
    labels: view(Uint16Array, section.labels),
    idOffsets: view(Uint32Array, section.id_offsets),
    idBytes: view(Uint8Array, section.ids),
    pointsEnd: sectionEnd(section.labels, Uint16Array),
    idsReady: false,
  };
}

// The binary block of a whole response -> the map (ids included).
export function parseMapBlock(buffer) {
  const header = readHeader(new Uint8Array(buffer));
  if (!header || header.size > buffer.byteLength) {
    throw new MapFormatError("the binary map is cut short (download interrupted?)");
  }
  const map = mapOver(buffer, header);
  map.idsReady = true;
  return map;
}

// Reads a /map?format=binary response as it arrives. Once positions and labels are in (the first ~40 %
// of the block), `onPoints(map)` is awaited before the rest is read: the page draws the map first, and
// only then does the browser go on receiving and unpacking the ids (which only hover needs), instead
// of both sharing the processor before the first drawing. Resolves to the map with its ids.
export async function readMap(response, onPoints) {
  const reader = response.body.getReader();
  let head = new Uint8Array(0);
  let block = null;
  let received = 0;
  let map = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (!block) {
      const joined = new Uint8Array(head.length + value.length);
      joined.set(head);
      joined.set(value, head.length);
      head = joined;
      const header = readHeader(head);
      if (!header) continue;
      if (head.length > header.size) throw new MapFormatError("the binary map is longer than its header says");
      block = new Uint8Array(header.size);
      block.set(head);
      received = head.length;
      map = mapOver(block.buffer, header);
      head = null;
    } else {
      if (received + value.length > block.length) throw new MapFormatError("the binary map is longer than its header says");
      block.set(value, received);
      received += value.length;
    }
    if (onPoints && received >= map.pointsEnd) {
      const callback = onPoints;
      onPoints = null;
      await callback(map);
    }
  }
  if (!block || received !== block.length) {
    throw new MapFormatError("the binary map is cut short (download interrupted?)");
  }
  if (onPoints) await onPoints(map);
  map.idsReady = true;
  return map;
}

const textDecoder = new TextDecoder();

// Id of reference image i, decoded only when asked for (hover), never for all points; null until the
// ids have arrived.
export function idOf(map, i) {
  if (!map.idsReady) return null;
  return textDecoder.decode(map.idBytes.subarray(map.idOffsets[i], map.idOffsets[i + 1]));
}

export function countBySlot(map) {
  const counts = new Float64Array(map.classNames.length + 1);
  const { labels } = map;
  const unlabelledSlot = map.classNames.length;
  for (let i = 0; i < labels.length; i++) counts[labels[i] === UNLABELLED ? unlabelledSlot : labels[i]]++;
  return counts;
}

// The uniform grid: one record per point, sorted by cell (row-major), 4 words each: x, y (float32),
// class slot, reference image index (uint32). One record is one read while drawing, in memory order.
// Within a cell the records are shuffled (a fixed pseudo-random order), so that where points share a
// pixel no class is always the one drawn last (collections are often stored class by class).
export function buildIndex(map) {
  const { count: n, xs, ys, labels, bounds } = map;
  const side = Math.max(1, Math.ceil(Math.sqrt(n / POINTS_PER_CELL)));
  const width = bounds.maxX - bounds.minX || 1;
  const height = bounds.maxY - bounds.minY || 1;
  const fx = side / width;
  const fy = side / height;
  const cells = side * side;
  const cellOf = new Uint32Array(n);
  const starts = new Uint32Array(cells + 1);
  const { minX, minY } = bounds;
  for (let i = 0; i < n; i++) {
    let gx = ((xs[i] - minX) * fx) | 0;
    let gy = ((ys[i] - minY) * fy) | 0;
    if (gx >= side) gx = side - 1;
    if (gy >= side) gy = side - 1;
    const cell = gy * side + gx;
    cellOf[i] = cell;
    starts[cell + 1]++;
  }
  for (let c = 0; c < cells; c++) starts[c + 1] += starts[c];
  const fill = starts.slice(0, cells);
  const records = new ArrayBuffer(16 * n);
  const f32 = new Float32Array(records);
  const u32 = new Uint32Array(records);
  const unlabelledSlot = map.classNames.length;
  for (let i = 0; i < n; i++) {
    const at = 4 * fill[cellOf[i]]++;
    const label = labels[i];
    f32[at] = xs[i];
    f32[at + 1] = ys[i];
    u32[at + 2] = label === UNLABELLED ? unlabelledSlot : label;
    u32[at + 3] = i;
  }
  let seed = 12345;
  for (let c = 0; c < cells; c++) {
    const first = starts[c];
    for (let k = starts[c + 1] - 1; k > first; k--) {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      const j = first + (seed % (k - first + 1));
      for (let w = 0; w < 4; w++) {
        const t = u32[4 * k + w];
        u32[4 * k + w] = u32[4 * j + w];
        u32[4 * j + w] = t;
      }
    }
  }
  return { side, starts, f32, u32, minX, minY, fx, fy };
}

// The range of grid cells [g0, g1] covering data coordinates [lo, hi] along one axis (empty: g0 > g1).
export function cellRange(index, lo, hi, axis) {
  const [min, f] = axis === "x" ? [index.minX, index.fx] : [index.minY, index.fy];
  const g0 = Math.max(0, Math.floor((lo - min) * f));
  const g1 = Math.min(index.side - 1, Math.floor((hi - min) * f));
  return [g0, g1];
}

// Nearest shown point to (x, y) within `radius` (data units), as a reference image index; -1 if none.
export function nearest(index, x, y, radius, hiddenSlots) {
  const [gx0, gx1] = cellRange(index, x - radius, x + radius, "x");
  const [gy0, gy1] = cellRange(index, y - radius, y + radius, "y");
  const { starts, f32, u32, side } = index;
  let best = -1;
  let bestDistance = radius * radius;
  for (let gy = gy0; gy <= gy1 && gx0 <= gx1; gy++) {
    const end = starts[gy * side + gx1 + 1];
    for (let k = starts[gy * side + gx0]; k < end; k++) {
      if (hiddenSlots[u32[4 * k + 2]]) continue;
      const dx = f32[4 * k] - x;
      const dy = f32[4 * k + 1] - y;
      const d = dx * dx + dy * dy;
      if (d <= bestDistance) {
        bestDistance = d;
        best = k;
      }
    }
  }
  return best < 0 ? -1 : u32[4 * best + 3];
}

// Shown points whose centre lies in the data rectangle [x0, x1) x (y0, y1].
export function countInside(index, x0, x1, y0, y1, hiddenSlots) {
  const [gx0, gx1] = cellRange(index, x0, x1, "x");
  const [gy0, gy1] = cellRange(index, y0, y1, "y");
  const { starts, f32, u32, side } = index;
  let inside = 0;
  for (let gy = gy0; gy <= gy1 && gx0 <= gx1; gy++) {
    const end = starts[gy * side + gx1 + 1];
    for (let k = starts[gy * side + gx0]; k < end; k++) {
      if (hiddenSlots[u32[4 * k + 2]]) continue;
      const x = f32[4 * k];
      const y = f32[4 * k + 1];
      if (x >= x0 && x < x1 && y > y0 && y <= y1) inside++;
    }
  }
  return inside;
}
