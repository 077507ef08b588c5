// Drawing the reference map's points: WebGL on a graphics card, the canvas 2-D renderer otherwise.
//
// Both show density the same way: a pixel covered by one point has its class's colour; where points
// overplot, the pixel is darkened by the number of points on it (8 steps: 1, 2-3, 4-7, ... 128 or more
// points), so dense regions stand out from sparse ones at any zoom. WebGL adds up the points of each
// pixel on the card (additive blending into a floating-point target: colour sum and count), then a
// second pass turns sum and count into the mean colour, darkened. The 2-D renderer counts the points
// of each pixel in one 32-bit word (count, and the colour of the last point drawn there) and writes
// the pixels itself: on a machine whose WebGL is a software emulation (SwiftShader, llvmpipe), which
// draws ~200,000 points a second on one core, it is 100 times faster (benchmarks/README.md).

import { cellRange } from "./map-data.js";

export const DENSITY_LEVELS = 8;
export const DARKEN = 0.6; // the darkest step keeps 40 % of the colour

export function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

function shade(level) {
  return 1 - (DARKEN * level) / (DENSITY_LEVELS - 1);
}

// ---- canvas 2-D ----------------------------------------------------------------------------------

export class CanvasRenderer {
  constructor(canvas) {
    this.kind = "canvas";
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.width = 0;
    this.height = 0;
    this.last = null; // the frame drawn last, for the panning shortcut
  }

  // slotColours: [r, g, b] per class slot (classes, then unlabelled); colourIndex: palette entry per slot.
  setData(map, index, slotColours, colourIndex) {
    this.index = index;
    const palette = Math.max(...colourIndex) + 1;
    this.tag = new Uint32Array(colourIndex.length);
    for (let s = 0; s < colourIndex.length; s++) this.tag[s] = (colourIndex[s] + 1) << 24;
    // Pixel value per (palette entry, density step), as ImageData's bytes (RGBA) read as one
    // little-endian Uint32 (ABGR).
    this.lut = new Uint32Array(palette * DENSITY_LEVELS);
    for (let s = 0; s < colourIndex.length; s++) {
      const [r, g, b] = slotColours[s];
      for (let level = 0; level < DENSITY_LEVELS; level++) {
        const f = shade(level);
        const packed = (255 << 24) | (Math.round(b * f) << 16) | (Math.round(g * f) << 8) | Math.round(r * f);
        this.lut[colourIndex[s] * DENSITY_LEVELS + level] = packed >>> 0;
      }
    }
    this.last = null;
  }

  resize(width, height) {
    this.width = width;
    this.height = height;
    this.canvas.width = width;
    this.canvas.height = height;
    this.image = this.context.createImageData(width, height);
    this.pixels = new Uint32Array(this.image.data.buffer);
    this.accumulator = new Uint32Array(width * height); // (palette entry + 1) << 24 | points on the pixel
    this.last = null;
  }

  // frame: {cx, cy, scale, pointSize, hidden (Uint8Array per slot), background ([r, g, b])}. Returns the
  // number of points drawn (shown points whose centre lies on the canvas), or null when not counted.
  draw(frame) {
    const { width: w, height: h } = this;
    const ox = w / 2 - frame.cx * frame.scale;
    const oy = h / 2 + frame.cy * frame.scale;
    const [br, bg, bb] = frame.background;
    this.background = ((255 << 24) | (bb << 16) | (bg << 8) | br) >>> 0;
    const shift = this.panShift(frame, ox, oy);
    let drawn = null;
    if (shift) {
      // Panned by whole pixels, nothing else changed: move the last picture and draw only the strips
      // that came into view (a drag costs a fraction of a full drawing).
      const [dx, dy] = shift;
      this.move(this.accumulator, dx, dy);
      this.move(this.pixels, dx, dy);
      const strips = [];
      if (dx > 0) strips.push([0, 0, dx, h]);
      if (dx < 0) strips.push([w + dx, 0, w, h]);
      const [sx0, sx1] = [Math.max(0, dx), Math.min(w, w + dx)];
      if (dy > 0) strips.push([sx0, 0, sx1, dy]);
      if (dy < 0) strips.push([sx0, h + dy, sx1, h]);
      for (const [x0, y0, x1, y1] of strips) {
        for (let y = y0; y < y1; y++) this.accumulator.fill(0, y * w + x0, y * w + x1);
        if (this.index) this.accumulateSquares(frame, ox, oy, x0, y0, x1, y1);
        this.resolve(x0, y0, x1, y1);
      }
    } else {
      this.accumulator.fill(0);
      if (this.index) drawn = frame.pointSize === 1 ? this.accumulateDots(frame, ox, oy) : this.accumulateSquares(frame, ox, oy, 0, 0, w, h);
      this.resolve(0, 0, w, h);
    }
    this.context.putImageData(this.image, 0, 0);
    this.last = { ...frame, ox, oy };
    return drawn;
  }

  // [dx, dy] when `frame` is the last frame moved by whole pixels, less than the canvas; else null.
  panShift(frame, ox, oy) {
    const last = this.last;
    if (!last || last.scale !== frame.scale || last.pointSize !== frame.pointSize) return null;
    if (last.hiddenVersion !== frame.hiddenVersion || last.background !== frame.background) return null;
    const dx = Math.round(ox - last.ox);
    const dy = Math.round(oy - last.oy);
    if (Math.abs(ox - last.ox - dx) > 1e-6 || Math.abs(oy - last.oy - dy) > 1e-6) return null;
    if (Math.abs(dx) >= this.width || Math.abs(dy) >= this.height || (dx === 0 && dy === 0)) return null;
    return [dx, dy];
  }

  // Moves a canvas-sized array by (dx, dy) pixels. Pixels that wrap around a row end up in the strips
  // that are drawn afresh.
  move(array, dx, dy) {
    const offset = dy * this.width + dx;
    if (offset > 0) array.copyWithin(offset, 0, array.length - offset);
    else array.copyWithin(0, -offset, array.length);
  }

  resolve(x0, y0, x1, y1) {
    const { width: w, accumulator: acc, pixels, lut, background } = this;
    const last = DENSITY_LEVELS - 1;
    for (let y = y0; y < y1; y++) {
      for (let p = y * w + x0, end = y * w + x1; p < end; p++) {
        const v = acc[p];
        if (v === 0) {
          pixels[p] = background;
        } else {
          const level = 31 - Math.clz32(v & 0xffffff);
          pixels[p] = lut[((v >>> 24) - 1) * DENSITY_LEVELS + (level < last ? level : last)];
        }
      }
    }
  }

  // One pixel per point, over the whole canvas (the common case for big maps at a low zoom).
  accumulateDots(frame, ox, oy) {
    const { width: w, height: h, accumulator: acc, tag, index } = this;
    const { scale, hidden } = frame;
    const [gx0, gx1] = cellRange(index, -ox / scale, (w - ox) / scale, "x");
    const [gy0, gy1] = cellRange(index, (oy - h) / scale, oy / scale, "y");
    const { starts, f32, u32, side } = index;
    let drawn = 0;
    for (let gy = gy0; gy <= gy1 && gx0 <= gx1; gy++) {
      const end = 4 * starts[gy * side + gx1 + 1];
      for (let k = 4 * starts[gy * side + gx0]; k < end; k += 4) {
        const s = u32[k + 2];
        if (hidden[s]) continue;
        const px = ox + f32[k] * scale;
        const py = oy - f32[k + 1] * scale;
        if (px < 0 || py < 0 || px >= w || py >= h) continue;
        const p = (py | 0) * w + (px | 0);
        acc[p] = tag[s] | ((acc[p] & 0xffffff) + 1);
        drawn++;
      }
    }
    return drawn;
  }

  // Squares of frame.pointSize pixels, clipped to the pixel rectangle [x0, x1) x [y0, y1).
  accumulateSquares(frame, ox, oy, x0, y0, x1, y1) {
    const { width: w, height: h, accumulator: acc, tag, index } = this;
    const { scale, hidden } = frame;
    const size = frame.pointSize;
    const half = size / 2;
    const [gx0, gx1] = cellRange(index, (x0 - half - ox) / scale, (x1 + half - ox) / scale, "x");
    const [gy0, gy1] = cellRange(index, (oy - y1 - half) / scale, (oy - y0 + half) / scale, "y");
    const { starts, f32, u32, side } = index;
    let drawn = 0;
    for (let gy = gy0; gy <= gy1 && gx0 <= gx1; gy++) {
      const end = 4 * starts[gy * side + gx1 + 1];
      for (let k = 4 * starts[gy * side + gx0]; k < end; k += 4) {
        const s = u32[k + 2];
        if (hidden[s]) continue;
        const px = ox + f32[k] * scale;
        const py = oy - f32[k + 1] * scale;
        // The pixels whose centres the square covers, as WebGL's points do.
        const left = Math.floor(px - half + 0.5);
        const top = Math.floor(py - half + 0.5);
        const ax = left > x0 ? left : x0;
        const ay = top > y0 ? top : y0;
        const bx = left + size < x1 ? left + size : x1;
        const by = top + size < y1 ? top + size : y1;
        if (ax >= bx || ay >= by) continue;
        if (px >= 0 && py >= 0 && px < w && py < h) drawn++;
        const t = tag[s];
        for (let y = ay, row = ay * w; y < by; y++, row += w) {
          for (let x = ax; x < bx; x++) acc[row + x] = t | ((acc[row + x] & 0xffffff) + 1);
        }
      }
    }
    return drawn;
  }
}

// ---- WebGL 2 -------------------------------------------------------------------------------------

const POINTS_VERTEX = `#version 300 es
layout(location = 0) in float x;
layout(location = 1) in float y;
layout(location = 2) in uint label;
uniform vec2 u_centre;
uniform vec2 u_scale; // data units -> clip space
uniform float u_size;
uniform int u_unlabelled;
uniform sampler2D u_palette; // per class slot: colour, alpha 0 when hidden
flat out vec3 v_colour;
void main() {
  int slot = label == 65535u ? u_unlabelled : int(label);
  vec4 colour = texelFetch(u_palette, ivec2(slot % 256, slot / 256), 0);
  if (colour.a < 0.5) {
    gl_Position = vec4(2.0, 2.0, 2.0, 1.0); // hidden class: outside the clip volume
    gl_PointSize = 1.0;
    return;
  }
  gl_Position = vec4((vec2(x, y) - u_centre) * u_scale, 0.0, 1.0);
  gl_PointSize = u_size;
  v_colour = colour.rgb;
}`;

const POINTS_FRAGMENT = `#version 300 es
precision highp float;
flat in vec3 v_colour;
out vec4 sum;
void main() { sum = vec4(v_colour, 1.0); } // added up per pixel: colour sum, count
`;

const RESOLVE_VERTEX = `#version 300 es
void main() { // one triangle covering the viewport
  vec2 corner = vec2(float((gl_VertexID << 1) & 2), float(gl_VertexID & 2));
  gl_Position = vec4(corner * 2.0 - 1.0, 0.0, 1.0);
}`;

const RESOLVE_FRAGMENT = `#version 300 es
precision highp float;
uniform sampler2D u_sum;
uniform vec3 u_background;
out vec4 colour;
void main() {
  vec4 sum = texelFetch(u_sum, ivec2(gl_FragCoord.xy), 0);
  if (sum.a < 0.5) {
    colour = vec4(u_background, 1.0);
    return;
  }
  float level = min(${DENSITY_LEVELS - 1}.0, floor(log2(sum.a + 0.5)));
  colour = vec4(sum.rgb / sum.a * (1.0 - ${DARKEN} * level / ${DENSITY_LEVELS - 1}.0), 1.0);
}`;

const SOFTWARE_RENDERER = /swiftshader|llvmpipe|softpipe|software|basic render/i;

// WebGL's renderer name, and whether it is a software emulation (no graphics card doing the work).
export function describeWebGL(gl) {
  const info = gl.getExtension("WEBGL_debug_renderer_info");
  const name = String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER) || "");
  return { name, software: SOFTWARE_RENDERER.test(name) };
}

export class WebGLRenderer {
  // A renderer on `canvas`, or {error} saying why WebGL cannot be used there.
  static create(canvas, { allowSoftware }) {
    const gl = canvas.getContext("webgl2", {
      alpha: false,
      antialias: false,
      depth: false,
      stencil: false,
      premultipliedAlpha: false,
      preserveDrawingBuffer: true, // the drawn map stays readable (screenshots, tests) between frames
    });
    if (!gl) return { error: "this browser offers no WebGL 2" };
    const device = describeWebGL(gl);
    if (device.software && !allowSoftware) return { error: `WebGL is a software emulation here (${device.name})` };
    if (!gl.getExtension("EXT_color_buffer_float")) return { error: "WebGL cannot draw into floating-point targets" };
    try {
      return { renderer: new WebGLRenderer(canvas, gl, device) };
    } catch (error) {
      return { error: `WebGL set-up failed: ${error.message}` };
    }
  }

  constructor(canvas, gl, device) {
    this.kind = "webgl";
    this.device = device.name;
    this.canvas = canvas;
    this.gl = gl;
    this.points = program(gl, POINTS_VERTEX, POINTS_FRAGMENT);
    this.resolve = program(gl, RESOLVE_VERTEX, RESOLVE_FRAGMENT);
    this.uniforms = {};
    for (const name of ["u_centre", "u_scale", "u_size", "u_unlabelled", "u_palette"]) {
      this.uniforms[name] = gl.getUniformLocation(this.points, name);
    }
    this.uniforms.u_sum = gl.getUniformLocation(this.resolve, "u_sum");
    this.uniforms.u_background = gl.getUniformLocation(this.resolve, "u_background");
    this.vao = gl.createVertexArray();
    this.emptyVao = gl.createVertexArray();
    this.sumTexture = null;
    this.framebuffer = gl.createFramebuffer();
    this.count = 0;
    this.hiddenKey = null;
    this.lost = false;
    canvas.addEventListener("webglcontextlost", () => {
      this.lost = true;
    });
  }

  setData(map, index, slotColours) {
    const gl = this.gl;
    gl.bindVertexArray(this.vao);
    const attribute = (location, array, integer) => {
      const buffer = gl.createBuffer();
      gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
      gl.bufferData(gl.ARRAY_BUFFER, array, gl.STATIC_DRAW);
      gl.enableVertexAttribArray(location);
      if (integer) gl.vertexAttribIPointer(location, 1, gl.UNSIGNED_SHORT, 0, 0);
      else gl.vertexAttribPointer(location, 1, gl.FLOAT, false, 0, 0);
    };
    attribute(0, map.xs, false);
    attribute(1, map.ys, false);
    attribute(2, map.labels, true);
    gl.bindVertexArray(null);
    this.count = map.count;
    this.slotColours = slotColours;
    this.unlabelledSlot = map.classNames.length;
    this.palette = gl.createTexture();
    this.paletteRows = Math.ceil(slotColours.length / 256);
    this.paletteData = new Uint8Array(256 * this.paletteRows * 4);
    this.hiddenKey = null;
  }

  updatePalette(hidden) {
    const key = hidden.join("");
    if (key === this.hiddenKey) return;
    this.hiddenKey = key;
    const data = this.paletteData;
    this.slotColours.forEach(([r, g, b], s) => data.set([r, g, b, hidden[s] ? 0 : 255], 4 * s));
    const gl = this.gl;
    gl.bindTexture(gl.TEXTURE_2D, this.palette);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA8, 256, this.paletteRows, 0, gl.RGBA, gl.UNSIGNED_BYTE, data);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
  }

  resize(width, height) {
    const gl = this.gl;
    this.width = width;
    this.height = height;
    this.canvas.width = width;
    this.canvas.height = height;
    if (this.sumTexture) gl.deleteTexture(this.sumTexture);
    this.sumTexture = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, this.sumTexture);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA16F, width, height, 0, gl.RGBA, gl.HALF_FLOAT, null);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
    gl.bindFramebuffer(gl.FRAMEBUFFER, this.framebuffer);
    gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0, gl.TEXTURE_2D, this.sumTexture, 0);
    const status = gl.checkFramebufferStatus(gl.FRAMEBUFFER);
    gl.bindFramebuffer(gl.FRAMEBUFFER, null);
    if (status !== gl.FRAMEBUFFER_COMPLETE) throw new Error(`floating-point target incomplete (${status})`);
  }

  // Returns null: the points drawn are counted on demand (map.js), not on every frame.
  draw(frame) {
    const { gl, uniforms: u } = this;
    if (this.lost || gl.isContextLost()) throw new Error("the WebGL context was lost");
    gl.viewport(0, 0, this.width, this.height);
    // Pass 1: every point adds its colour and 1 to its pixels.
    gl.bindFramebuffer(gl.FRAMEBUFFER, this.framebuffer);
    gl.clearColor(0, 0, 0, 0);
    gl.clear(gl.COLOR_BUFFER_BIT);
    if (this.count > 0) {
      this.updatePalette(frame.hidden);
      gl.useProgram(this.points);
      gl.enable(gl.BLEND);
      gl.blendFunc(gl.ONE, gl.ONE);
      gl.activeTexture(gl.TEXTURE0);
      gl.bindTexture(gl.TEXTURE_2D, this.palette);
      gl.uniform1i(u.u_palette, 0);
      gl.uniform2f(u.u_centre, frame.cx, frame.cy);
      gl.uniform2f(u.u_scale, (2 * frame.scale) / this.width, (2 * frame.scale) / this.height);
      gl.uniform1f(u.u_size, frame.pointSize);
      gl.uniform1i(u.u_unlabelled, this.unlabelledSlot);
      gl.bindVertexArray(this.vao);
      gl.drawArrays(gl.POINTS, 0, this.count);
      gl.disable(gl.BLEND);
    }
    // Pass 2: sum and count -> the mean colour, darkened by the count.
    gl.bindFramebuffer(gl.FRAMEBUFFER, null);
    gl.useProgram(this.resolve);
    gl.activeTexture(gl.TEXTURE0);
    gl.bindTexture(gl.TEXTURE_2D, this.sumTexture);
    gl.uniform1i(u.u_sum, 0);
    const [r, g, b] = frame.background;
    gl.uniform3f(u.u_background, r / 255, g / 255, b / 255);
    gl.bindVertexArray(this.emptyVao);
    gl.drawArrays(gl.TRIANGLES, 0, 3);
    gl.bindVertexArray(null);
    return null;
  }
}

function program(gl, vertexSource, fragmentSource) {
  const compile = (type, source) => {
    const shader = gl.createShader(type);
    gl.shaderSource(shader, source);
    gl.compileShader(shader);
    if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
    return shader;
  };
  const linked = gl.createProgram();
  gl.attachShader(linked, compile(gl.VERTEX_SHADER, vertexSource));
  gl.attachShader(linked, compile(gl.FRAGMENT_SHADER, fragmentSource));
  gl.linkProgram(linked);
  if (!gl.getProgramParameter(linked, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(linked));
  return linked;
}
