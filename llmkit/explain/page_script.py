"""The script inlined into every explain page: draws the heatmaps on canvases and builds the tables
from the page's inline JSON. Text goes in through textContent and fillText only, never as HTML."""

SCRIPT = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("data").textContent);
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function shade(t) {  // 0 → white, 1 → dark blue
    t = Math.max(0, Math.min(1, t));
    const c = [255 + (8 - 255) * t, 255 + (48 - 255) * t, 255 + (107 - 255) * t].map(Math.round);
    return "rgb(" + c.join(",") + ")";
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : v.toFixed(4);
  }
  document.getElementById("title").textContent = data.title;
  document.getElementById("intuition").textContent = data.intuition;
  const maps = document.getElementById("maps");
  for (const hm of data.heatmaps) {
    const box = el("div", null, "map");
    box.appendChild(el("h2", hm.title));
    const select = el("select");
    hm.maps.forEach(function (m, i) { const o = el("option", m.name); o.value = String(i); select.appendChild(o); });
    const label = el("label", "map");
    label.appendChild(select);
    box.appendChild(label);
    const canvas = el("canvas");
    canvas.className = "heatmap";
    const hover = el("div", "", "hover");
    box.appendChild(el("br"));
    box.appendChild(canvas);
    box.appendChild(hover);
    maps.appendChild(box);
    const cell = Math.max(16, Math.min(44, Math.floor(720 / Math.max(hm.cols.length, 1))));
    let left = 0, top = 0;
    function draw() {
      const values = hm.maps[Number(select.value)].values;
      const ctx = canvas.getContext("2d");
      ctx.font = "13px sans-serif";
      left = 10 + Math.max.apply(null, hm.rows.map(function (r) { return ctx.measureText(r).width; }).concat([10]));
      top = 10 + Math.max.apply(null, hm.cols.map(function (c) { return ctx.measureText(c).width; }).concat([10]));
      canvas.width = left + cell * hm.cols.length + 4;
      canvas.height = top + cell * hm.rows.length + 4;
      ctx.font = "13px sans-serif";
      let vmax = hm.vmax || 0;
      if (!vmax) values.forEach(function (row) { row.forEach(function (v) { if (v !== null && v > vmax) vmax = v; }); });
      vmax = vmax || 1;
      values.forEach(function (row, i) {
        row.forEach(function (v, j) {
          ctx.fillStyle = v === null ? "#eee" : shade(v / vmax);
          ctx.fillRect(left + j * cell, top + i * cell, cell - 1, cell - 1);
        });
      });
      ctx.fillStyle = "#000";
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      hm.rows.forEach(function (r, i) { ctx.fillText(r, left - 4, top + i * cell + cell / 2); });
      hm.cols.forEach(function (c, j) {
        ctx.save();
        ctx.translate(left + j * cell + cell / 2, top - 4);
        ctx.rotate(-Math.PI / 2);
        ctx.textAlign = "left";
        ctx.fillText(c, 0, 0);
        ctx.restore();
      });
    }
    canvas.addEventListener("mousemove", function (ev) {
      const rect = canvas.getBoundingClientRect();
      const j = Math.floor((ev.clientX - rect.left - left) / cell), i = Math.floor((ev.clientY - rect.top - top) / cell);
      const values = hm.maps[Number(select.value)].values;
      if (i >= 0 && j >= 0 && i < hm.rows.length && j < hm.cols.length) {
        hover.textContent = hm.rows[i] + " \u2192 " + hm.cols[j] + ": " + fmt(values[i][j]);
      }
    });
    select.addEventListener("change", draw);
    draw();
  }
  const tables = document.getElementById("tables");
  for (const t of data.tables) {
    tables.appendChild(el("h2", t.title));
    const table = el("table"), head = el("tr");
    t.columns.forEach(function (c) { head.appendChild(el("th", c)); });
    table.appendChild(head);
    t.rows.forEach(function (row) {
      const tr = el("tr");
      row.forEach(function (v) { tr.appendChild(el("td", fmt(v), typeof v === "number" ? "n" : null)); });
      table.appendChild(tr);
    });
    tables.appendChild(table);
  }
  const notes = document.getElementById("notes");
  for (const n of data.notes) notes.appendChild(el("p", n, "note"));
})();
"""
