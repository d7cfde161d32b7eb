// Progress of every annotator, for the admin token (from the URL fragment: never sent to the server log).
"use strict";
const TOKEN = new URLSearchParams(location.hash.slice(1)).get("token") || "";

async function refresh() {
  const r = await fetch("/api/admin/progress", {headers: {"Authorization": "Bearer " + TOKEN}});
  if (!r.ok) {
    document.getElementById("status").textContent = "refused: " + r.status;
    return;
  }
  const data = await r.json();
  document.getElementById("summary").textContent =
    data.tasks + " tasks, each seen by up to " + data.overlap + " annotator(s)";
  const body = document.querySelector("#table tbody");
  body.replaceChildren();
  for (const [name, p] of Object.entries(data.annotators)) {
    const tr = document.createElement("tr");
    for (const v of [name, p.done, data.tasks]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    body.append(tr);
  }
}
refresh();
setInterval(refresh, 5000);
