// The annotator's page: fetch the next task, show it, send one vote, repeat. Model text only ever goes in
// through textContent, so a response holding HTML or <script> is shown as text and never runs.
"use strict";
const NAME = decodeURIComponent(location.pathname.split("/").pop());
const TOKEN = new URLSearchParams(location.hash.slice(1)).get("token") || "";
const LETTERS = "ABCDEFGHIJ";
let current = null;      // {task, shown, criteria}
let voteId = null;       // one id per task shown: a retried send stores the vote once
let ranking = [];        // display positions, best first
let started = 0;
let sending = false;

const $ = (id) => document.getElementById(id);
const setStatus = (text) => { $("status").textContent = text; };

async function api(path, body) {
  const opts = {headers: {"Authorization": "Bearer " + TOKEN}};
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch("/api/" + encodeURIComponent(NAME) + path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(r.status + ": " + (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)));
  return data;
}

function showProgress(p) { $("progress").textContent = p.done + " / " + p.total + " done"; }

function card(text, position) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.position = position;
  const h = document.createElement("h3");
  h.textContent = "Response " + LETTERS[position] + " (" + (position + 1) + ")";
  const pre = document.createElement("pre");
  pre.textContent = text;
  div.append(h, pre);
  div.addEventListener("click", () => { if (current && current.task.kind === "ranking") pick(position); });
  return div;
}

function criteriaControls(names) {
  const box = $("criteria");
  box.replaceChildren();
  for (const c of names) {
    const label = document.createElement("label");
    label.textContent = c + ": ";
    const sel = document.createElement("select");
    sel.id = "criterion-" + c;
    for (const v of ["", "A", "B", "tie"]) {
      const o = document.createElement("option");
      o.value = v;
      o.textContent = v || "—";
      sel.append(o);
    }
    label.append(sel);
    box.append(label);
  }
}

async function load() {
  $("who").textContent = NAME;
  setStatus("loading…");
  try {
    const data = await api("/next");
    showProgress(data.progress);
    if (!data.task) {
      current = null;
      $("prompt").textContent = "All done: no task left for you. Thank you!";
      $("responses").replaceChildren();
      $("pairwise").hidden = $("ranking").hidden = true;
      setStatus("");
      return;
    }
    current = data;
    voteId = crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random();
    ranking = [];
    started = performance.now();
    $("prompt").textContent = data.task.prompt;
    $("responses").replaceChildren(...data.task.responses.map((t, i) => card(t, i)));
    $("pairwise").hidden = data.task.kind !== "pairwise";
    $("ranking").hidden = data.task.kind !== "ranking";
    if (data.task.kind === "pairwise") criteriaControls(data.criteria);
    renderRanking();
    $("unsafe").checked = false;
    $("rationale").value = "";
    document.body.dataset.task = data.task.id;   // tests read which task is on screen
    setStatus("");
  } catch (e) {
    setStatus("could not load a task: " + e.message);
  }
}

function renderRanking() {
  const ol = $("order");
  ol.replaceChildren();
  ranking.forEach((position, place) => {
    const li = document.createElement("li");
    li.textContent = "Response " + LETTERS[position];
    li.draggable = true;
    li.dataset.place = place;
    li.addEventListener("dragstart", (ev) => ev.dataTransfer.setData("text/plain", String(place)));
    li.addEventListener("dragover", (ev) => ev.preventDefault());
    li.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const from = Number(ev.dataTransfer.getData("text/plain"));
      const [moved] = ranking.splice(from, 1);
      ranking.splice(place, 0, moved);
      renderRanking();
    });
    ol.append(li);
  });
  document.querySelectorAll(".card").forEach((c) =>
    c.classList.toggle("ranked", ranking.includes(Number(c.dataset.position))));
  $("submit-ranking").disabled = !current || ranking.length !== current.task.responses.length;
}

function pick(position) {
  if (!current || ranking.includes(position) || position >= current.task.responses.length) return;
  ranking.push(position);
  renderRanking();
}

async function send(fields) {
  if (!current || sending) return;
  sending = true;
  const body = Object.assign({vote_id: voteId, task_id: current.task.id, shown: current.shown,
    unsafe: $("unsafe").checked, rationale: $("rationale").value,
    seconds: (performance.now() - started) / 1000}, fields);
  setStatus("saving…");
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await api("/vote", body);
      showProgress(r.progress);
      sending = false;
      return load();
    } catch (e) {
      if (attempt >= 4 || /^4\d\d/.test(e.message)) {   // client errors are not retried
        setStatus("not saved: " + e.message);
        sending = false;
        return;
      }
      await new Promise((ok) => setTimeout(ok, 500 * (attempt + 1)));
    }
  }
}

function votePairwise(choice, strength) {
  const criteria = {};
  for (const c of current.criteria) {
    const v = $("criterion-" + c).value;
    if (v) criteria[c] = v;
  }
  const fields = {choice: choice, criteria: criteria};
  if (strength) fields.strength = strength;
  return send(fields);
}

document.querySelectorAll("#pairwise [data-choice]").forEach((b) =>
  b.addEventListener("click", () => votePairwise(b.dataset.choice, b.dataset.strength)));
$("submit-ranking").addEventListener("click", () => send({ranking: ranking}));

const PAIR_KEYS = {"1": ["A", "clearly"], "2": ["A", "slightly"], "3": ["tie"], "4": ["B", "slightly"],
                   "5": ["B", "clearly"], "0": ["both_bad"]};
document.addEventListener("keydown", (ev) => {
  if (!current || ev.target.tagName === "TEXTAREA" || ev.target.tagName === "SELECT") return;
  if (ev.key === "u") { $("unsafe").checked = !$("unsafe").checked; return; }
  if (current.task.kind === "pairwise" && PAIR_KEYS[ev.key]) {
    ev.preventDefault();
    votePairwise(...PAIR_KEYS[ev.key]);
  } else if (current.task.kind === "ranking") {
    const n = Number(ev.key);
    if (n >= 1 && n <= current.task.responses.length) pick(n - 1);
    else if (ev.key === "Backspace") { ranking.pop(); renderRanking(); }
    else if (ev.key === "Enter" && ranking.length === current.task.responses.length) send({ranking: ranking});
  }
});

load();
