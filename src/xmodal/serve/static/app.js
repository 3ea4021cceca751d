"use strict";
const $ = (id) => document.getElementById(id);
const statusLine = $("status");
// With a token set (xmodal serve --token), every API call sends it; it is kept for this tab only.
const TOKEN_KEY = "xmodal-token";

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function api(path, request = {}) {
  return fetch(path, { ...request, headers: { ...(request.headers || {}), ...authHeaders() } });
}

function askForToken(message) {
  $("token-form").classList.add("shown");
  setStatus(message, true);
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

async function loadInfo() {
  try {
    const response = await api("/health");
    if (response.status === 401) {
      $("info").textContent = "this server needs a token";
      askForToken("enter the server's token to search");
      return;
    }
    const info = await response.json();
    $("info").textContent = `${info.count} ${info.modality} indexed (${info.kind})`;
  } catch (err) {
    $("info").textContent = "index information unavailable";
  }
}

function render(results) {
  const grid = $("results");
  grid.replaceChildren();
  for (const result of results) {
    const card = document.createElement("div");
    card.className = "result";
    if (result.thumbnail) {
      const img = document.createElement("img");
      img.alt = result.id;
      if (sessionStorage.getItem(TOKEN_KEY)) {
        // an <img> cannot send the token: fetch the image and show it from memory
        api(result.thumbnail).then((r) => (r.ok ? r.blob() : null)).then((blob) => {
          if (blob) img.src = URL.createObjectURL(blob);
        });
      } else {
        img.src = result.thumbnail;
        img.loading = "lazy";
      }
      card.append(img);
    }
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = result.thumbnail ? result.id : result.source;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `#${result.rank}  score ${result.score.toFixed(3)}`;
    card.append(caption, score);
    grid.append(card);
  }
}

async function runSearch(request, label) {
  setStatus(`searching for ${label}...`);
  const started = performance.now();
  try {
    const response = await api("/search", request);
    if (response.status === 401) {
      askForToken("this server needs a token: enter it and search again");
      return;
    }
    const body = await response.json();
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      throw new Error(`${response.status}: ${detail}`);
    }
    render(body.results);
    const ms = Math.round(performance.now() - started);
    setStatus(`${body.results.length} results for ${label} in ${ms} ms`);
  } catch (err) {
    $("results").replaceChildren();
    setStatus(`search failed: ${err.message}`, true);
  }
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  if (!text) return;
  runSearch({
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text, k: Number($("k").value) }),
  }, `"${text}"`);
});

function searchImage(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value);
  runSearch({ method: "POST", body: form }, `image ${file.name}`);
}

const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (event) => { if (event.key === "Enter") $("file").click(); });
$("file").addEventListener("change", () => {
  searchImage($("file").files[0]);
  $("file").value = "";  // choosing the same file again searches again
});
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  searchImage(event.dataTransfer.files[0]);
});

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").classList.remove("shown");
  setStatus("");
  loadInfo();
});

loadInfo();
