// The page's COCO RLE decoder (service/static/app.js) against pycocotools, on masks from real answers of
// the service. tests/test_web.py writes the cases (ONESTAGE_RLE_CASES) and runs this file with `node --test`.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { decodeRle, instanceColour, paintRle, rleRuns } from "../../service/static/app.js";

const cases = JSON.parse(readFileSync(process.env.ONESTAGE_RLE_CASES, "utf8"));

test("every mask decodes to pycocotools' mask, pixel for pixel", () => {
  assert.ok(cases.masks.length >= 10, "too few masks to mean anything");
  for (const c of cases.masks) {
    const mask = decodeRle(c.rle);
    const expected = Buffer.from(c.mask, "base64");
    assert.equal(mask.length, expected.length, c.name);
    assert.ok(Buffer.from(mask.buffer, mask.byteOffset, mask.length).equals(expected), `${c.name}: masks differ`);
  }
});

test("run lengths and areas equal pycocotools' uncompressed counts and the API's area", () => {
  for (const c of cases.masks) {
    assert.deepEqual(Array.from(rleRuns(c.rle.counts)), c.runs, c.name);
    assert.equal(paintRle(c.rle, new Uint8Array(c.rle.size[0] * c.rle.size[1]), 1), c.area, c.name);
  }
});

test("painting in answer order gives the service's label image (the higher score keeps overlaps)", () => {
  for (const answer of cases.labels) {
    const labels = new Uint16Array(answer.height * answer.width);
    answer.rles.forEach((rle, i) => paintRle(rle, labels, i + 1, true));
    const expected = Buffer.from(answer.labels, "base64"); // uint16 little-endian, row-major
    assert.ok(Buffer.from(labels.buffer).equals(expected), `${answer.name}: label images differ`);
  }
});

test("instance colours are the overlay PNG's", () => {
  cases.colours.forEach((rgb, i) => assert.deepEqual(instanceColour(i), rgb, `instance ${i}`));
});

test("a truncated or mis-sized RLE is refused, not drawn", () => {
  const { rle } = cases.masks[0];
  assert.throws(() => decodeRle({ size: rle.size, counts: rle.counts.slice(0, -1) + "a" }), /RLE|truncated/);
  assert.throws(() => decodeRle({ size: [rle.size[0] + 1, rle.size[1]], counts: rle.counts }), /RLE covers/);
});
