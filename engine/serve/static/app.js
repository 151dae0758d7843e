// The search page of `cvr serve`: vanilla JS, no build step, only same-origin requests (the CSP
// allows no inline script or style and no other origin).
"use strict";

const $ = (id) => document.getElementById(id);
const STAGES = ["text", "anchor", "vision", "tower", "search"];
let galleryVideos = null; // from /readyz: k is capped to it (the API refuses a larger k)
let segment = null; // [start, end] of the video in the player
let stopAtEnd = false;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function seconds(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

function segmentText(seg) {
  return seg ? `${seconds(seg[0])}\u2013${seconds(seg[1])} s` : "whole video";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// The API's errors are {"detail": "..."}; a schema violation (422) has a list of {loc, msg}.
function detailText(body, response) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  return `${response.status} ${response.statusText || "error"}`;
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error(`the server cannot be reached (${error.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    if (response.ok) throw new Error(`the server's answer is not JSON (${response.status})`);
  }
  if (!response.ok) throw new Error(detailText(body, response));
  return body;
}

async function refreshStatus() {
  try {
    const ready = await api("/readyz");
    galleryVideos = ready.videos;
    $("status").textContent = `${ready.videos} videos \u00b7 ${ready.backend} backend` +
      (ready.media ? "" : " \u00b7 no video files (features only)");
  } catch (error) {
    $("status").textContent = `server not ready: ${error.message}`;
  }
}

function parseFilters(text) {
  return text.split(/[,\n]/).map((f) => f.trim()).filter((f) => f);
}

function timingsText(timings, k, capped) {
  const parts = STAGES.filter((s) => typeof timings[s] === "number")
    .map((s) => `${s} ${timings[s].toFixed(1)} ms`);
  if (timings.batch) parts.push(`batch of ${timings.batch}`);
  if (timings.mode) parts.push(`${timings.mode} search`);
  if (capped) parts.push(`k capped to the gallery's ${k}`);
  return parts.join(" \u00b7 ");
}

function hitCard(hit) {
  const card = el("button", "hit");
  card.type = "button";
  card.dataset.id = hit.id;
  card.setAttribute("aria-label", `Play ${hit.id}, rank ${hit.rank}, segment ${segmentText(hit.segment)}`);
  if (hit.thumbnail) {
    const img = el("img", "thumb");
    img.src = hit.thumbnail;
    img.alt = `thumbnail of ${hit.id}`;
    img.loading = "lazy";
    card.append(img);
  } else {
    card.append(el("div", "thumb none", "no thumbnail"));
  }
  card.append(el("span", "hit-id", `${hit.rank}. ${hit.id}`));
  card.append(el("span", "hit-meta", `score ${hit.score.toFixed(3)} \u00b7 ${segmentText(hit.segment)}`));
  card.addEventListener("click", () => openPlayer(hit));
  return card;
}

function resultSection(result, k, capped) {
  const section = el("section", "result");
  section.append(el("h2", null, result.query));
  const body = el("div", "result-body");
  if (result.anchor) {
    const figure = el("figure", "anchor");
    const img = el("img");
    img.src = result.anchor;
    img.alt = `anchor image generated for \u201c${result.query}\u201d`;
    figure.append(img, el("figcaption", null, "anchor"));
    body.append(figure);
  }
  if (result.hits.length) {
    const grid = el("div", "hits");
    result.hits.forEach((hit) => grid.append(hitCard(hit)));
    body.append(grid);
  } else {
    body.append(el("p", "no-hits", "No hits: no video matches the filters."));
  }
  section.append(body, el("p", "timings", timingsText(result.timings_ms || {}, k, capped)));
  return section;
}

async function search(event) {
  event.preventDefault();
  const queries = $("query").value.split("|").map((q) => q.trim()).filter((q) => q);
  if (!queries.length) {
    showError("type a query first");
    return;
  }
  let k = Number($("k").value);
  const capped = galleryVideos !== null && galleryVideos > 0 && k > galleryVideos;
  if (capped) k = galleryVideos;
  const request = { queries, k, where: parseFilters($("filters").value), mode: "auto" };
  $("submit").disabled = true;
  $("results").setAttribute("aria-busy", "true");
  showError("");
  try {
    const answer = await api("/v1/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    const sections = answer.results.map((r) => resultSection(r, k, capped));
    sections.push(el("p", "timings", `request ${(answer.seconds * 1000).toFixed(0)} ms`));
    $("results").replaceChildren(...sections);
  } catch (error) {
    $("results").replaceChildren();
    showError(`Search failed: ${error.message}`);
  } finally {
    $("submit").disabled = false;
    $("results").removeAttribute("aria-busy");
    refreshStatus();
  }
}

function openPlayer(hit) {
  const video = $("video");
  segment = hit.segment;
  stopAtEnd = false;
  $("player-title").textContent = hit.path ? `${hit.id} (${hit.path})` : hit.id;
  $("segment-bar").hidden = true;
  $("replay").hidden = !(hit.file && segment);
  if (hit.file) {
    $("player-info").textContent = `matching segment ${segmentText(segment)}` +
      (typeof hit.segment_score === "number" ? ` (segment score ${hit.segment_score.toFixed(3)})` : "");
    video.hidden = false;
    video.src = hit.file;
  } else {
    $("player-info").textContent = "this video has no file on the server";
    video.removeAttribute("src");
    video.hidden = true;
  }
  $("player").showModal();
}

function onMetadata() {
  const video = $("video");
  if (!segment) return;
  video.currentTime = segment[0];
  if (video.duration > 0 && Number.isFinite(video.duration)) {
    const bar = $("segment-bar"); // CSSOM, not a style attribute: allowed by the CSP
    bar.style.left = `${(100 * segment[0]) / video.duration}%`;
    bar.style.width = `${(100 * Math.max(0, segment[1] - segment[0])) / video.duration}%`;
    bar.hidden = false;
  }
}

function replaySegment() {
  const video = $("video");
  if (!segment) return;
  video.currentTime = segment[0];
  stopAtEnd = true;
  video.play().catch((error) => showError(`The video cannot play: ${error.message}`));
}

function closePlayer() {
  const video = $("video");
  video.pause();
  $("player").close();
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", search);
  $("video").addEventListener("loadedmetadata", onMetadata);
  $("video").addEventListener("timeupdate", () => {
    const video = $("video");
    if (stopAtEnd && segment && video.currentTime >= segment[1]) {
      stopAtEnd = false;
      video.pause();
    }
  });
  $("video").addEventListener("error", () => {
    if ($("video").getAttribute("src")) $("player-info").textContent = "the video cannot be loaded or decoded";
  });
  $("replay").addEventListener("click", replaySegment);
  $("player-close").addEventListener("click", closePlayer);
  $("player").addEventListener("close", () => $("video").pause());
  $("player").addEventListener("click", (event) => {
    if (event.target === $("player")) closePlayer(); // a click on the backdrop
  });
  refreshStatus();
  $("query").focus();
});
