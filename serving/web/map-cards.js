// What the page shows of a placed image: its facts (score, evidence, nearest label, duplicate) and its
// nearest reference images. The same for an image just placed from the page (map.js) and for a journal
// row in the review queue (map-journal.js), so both read alike and change together.

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function fmt(value, digits = 2) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

export function addFact(facts, term, value) {
  facts.append(element("dt", "", term), element("dd", "", value));
}

// A placement's facts as a definition list (the caller may add more with addFact).
export function placementFacts(placed) {
  const facts = element("dl", "facts");
  addFact(facts, "score", `${fmt(placed.score)} (above 1 = flagged)`);
  const evidence = Object.entries(placed.evidence || {}).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ");
  if (evidence) addFact(facts, "evidence", evidence);
  if (placed.majority_label) {
    addFact(facts, "nearest label", `${placed.majority_label} (${Math.round(placed.majority_share * 100)} %)`);
  }
  if (placed.duplicate_of) addFact(facts, "duplicate of", placed.duplicate_of);
  return facts;
}

// Thumbnails of a placement's nearest reference images, with label and distance; `thumbnailUrl(index)`
// resolves to an image URL (or null).
export function neighbourStrip(neighbours, thumbnailUrl) {
  const strip = element("div", "neighbours");
  for (const neighbour of neighbours) {
    const figure = element("figure", "neighbour");
    const image = element("img");
    image.alt = neighbour.id;
    image.title = `${neighbour.id} (${neighbour.label ?? "unlabelled"}), distance ${fmt(neighbour.distance, 3)}`;
    thumbnailUrl(neighbour.index).then((url) => {
      if (url) image.src = url;
    });
    figure.append(image, element("figcaption", "", neighbour.label ?? "–"), element("figcaption", "", `d ${fmt(neighbour.distance)}`));
    strip.append(figure);
  }
  return strip;
}
