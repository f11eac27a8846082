// report.html: draws a run's clusters from the JSON embedded in the page (no server, no network).
(function () {
  "use strict";
  var errors = 0;
  window.addEventListener("error", function () {
    errors += 1;
    document.body.setAttribute("data-errors", String(errors));
  });
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#c7c7c7", "#dbdb8d", "#9edae5"];
  var STRIP = 16, PAGE = 240;
  var clusterOf = new Int32Array(data.n);
  data.clusters.forEach(function (c) { c.members.forEach(function (i) { clusterOf[i] = c.id; }); });

  function colour(i) { return PALETTE[i % PALETTE.length]; }
  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") node.textContent = attrs[key]; else node.setAttribute(key, attrs[key]);
    });
    for (var a = 2; a < arguments.length; a++) if (arguments[a]) node.appendChild(arguments[a]);
    return node;
  }
  function fmt(v) {
    if (v === null) return "-";
    return typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(4)) : String(v);
  }
  function fmtConfidence(v) { return v === null ? "-" : v.toFixed(3); }
  function className(y) { return y < 0 ? "unknown" : (data.classes[y] || String(y)); }
  function describe(i) {
    var parts = [data.names ? data.names[i] : "row " + i, "cluster " + clusterOf[i],
      "confidence " + fmtConfidence(data.confidence[i])];
    if (data.labels) parts.push("class " + className(data.labels[i]));
    return parts.join(" · ");
  }
  function thumb(i) {
    var s = data.sprites, d = el("div", {"class": "thumb", title: describe(i)});
    if (s) {
      var pos = s.position[i], sheet = Math.floor(pos / s.per_sheet), cell = pos % s.per_sheet;
      d.style.backgroundImage = "url(" + s.folder + "/sheet-" + String(sheet).padStart(4, "0") + ".jpg)";
      d.style.backgroundPosition = -(cell % s.columns) * s.size + "px " + -Math.floor(cell / s.columns) * s.size + "px";
    } else {
      d.textContent = String(i);
    }
    if (data.labels && data.labels[i] >= 0) d.style.borderColor = colour(data.labels[i]);
    return d;
  }
  function strip(indices) {
    var box = el("div", {"class": "strip"});
    indices.forEach(function (i) { box.appendChild(thumb(i)); });
    return box;
  }
  // a button that shows every image of ``indices``, a page at a time, only when asked
  function onDemand(label, indices) {
    var box = el("div", {"class": "all"}), shown = 0;
    var more = el("button", {type: "button", text: label + " (" + indices.length + ")"});
    more.addEventListener("click", function () {
      box.appendChild(strip(indices.slice(shown, shown + PAGE)));
      shown += PAGE;
      if (shown >= indices.length) more.remove();
      else more.textContent = "more (" + (indices.length - shown) + " left)";
    });
    return el("div", {}, box, more);
  }

  function summary() {
    var section = el("section", {id: "summary"}, el("h2", {text: "Summary"}));
    section.appendChild(el("p", {text: data.n + " images of the " + data.split + " split in " + data.k +
      " clusters. " + data.answer}));
    // split x metric for the run's own figures ("test/acc"); every figure in a list below
    var splits = [], names = [], rest = el("table", {"class": "metrics"});
    Object.keys(data.metrics).sort().forEach(function (key) {
      var parts = key.split("/");
      if (parts.length === 2) {
        if (splits.indexOf(parts[0]) < 0) splits.push(parts[0]);
        if (names.indexOf(parts[1]) < 0) names.push(parts[1]);
      }
      rest.appendChild(el("tr", {}, el("th", {text: key}), el("td", {text: fmt(data.metrics[key])})));
    });
    if (splits.length) {
      var grid = el("table", {"class": "grid"}), head = el("tr", {}, el("th", {text: "split"}));
      names.forEach(function (n) { head.appendChild(el("th", {text: n})); });
      grid.appendChild(head);
      splits.forEach(function (sp) {
        var tr = el("tr", {}, el("th", {text: sp}));
        names.forEach(function (n) {
          var v = data.metrics[sp + "/" + n];
          tr.appendChild(el("td", {text: v === undefined ? "" : fmt(v)}));
        });
        grid.appendChild(tr);
      });
      section.appendChild(grid);
    }
    if (Object.keys(data.metrics).length) {
      section.appendChild(el("details", {}, el("summary", {text: "every figure (" +
        Object.keys(data.metrics).length + ")"}), rest));
    }
    if (data.config) section.appendChild(el("details", {}, el("summary", {text: "config"}), el("pre", {text: data.config})));
    if (Object.keys(data.run_info).length) {
      section.appendChild(el("details", {}, el("summary", {text: "run info"}),
        el("pre", {text: JSON.stringify(data.run_info, null, 2)})));
    }
    return section;
  }

  function clusterSection(c) {
    var head = el("h3", {}, el("span", {"class": "swatch"}));
    head.firstChild.style.background = colour(data.colour[c.id]);
    head.appendChild(document.createTextNode("Cluster " + c.id + " · " + c.size + " images"));
    var section = el("section", {"class": "cluster", id: "cluster-" + c.id}, head);
    var facts = c.size ? "mean confidence " + fmtConfidence(c.mean_confidence) : "empty";
    if (c.majority !== undefined) facts += " · mostly " + className(c.majority) + " (purity " + c.purity.toFixed(3) + ")";
    section.appendChild(el("p", {"class": "facts", text: facts}));
    if (!c.size) return section;
    section.appendChild(el("h4", {text: "most confident"}));
    section.appendChild(strip(c.members.slice(0, STRIP)));
    if (c.size > STRIP) {
      section.appendChild(el("h4", {text: "least confident"}));
      section.appendChild(strip(c.members.slice(-STRIP).reverse()));
      section.appendChild(onDemand("all members", c.members));
    }
    if (c.others && c.others.length) {
      section.appendChild(el("h4", {text: "of other classes (" + c.others.length + ")"}));
      section.appendChild(strip(c.others.slice(0, STRIP)));
      if (c.others.length > STRIP) section.appendChild(onDemand("all of other classes", c.others));
    }
    return section;
  }

  function clusters() {
    var section = el("section", {id: "clusters"}, el("h2", {text: "Clusters"}));
    var nav = el("nav", {"class": "index"});
    data.clusters.forEach(function (c) {
      nav.appendChild(el("a", {href: "#cluster-" + c.id, text: c.id + " (" + c.size + ")"}));
    });
    section.appendChild(nav);
    data.clusters.forEach(function (c) { section.appendChild(clusterSection(c)); });
    return section;
  }

  function confusion() {
    var m = data.confusion, table = el("table", {"class": "confusion"});
    var max = Math.max.apply(null, m.counts.map(function (r) { return Math.max.apply(null, r); }).concat([1]));
    var header = el("tr", {}, el("th", {text: "class \\ cluster"}));
    m.columns.forEach(function (c) { header.appendChild(el("th", {}, el("a", {href: "#cluster-" + c, text: String(c)}))); });
    table.appendChild(header);
    m.counts.forEach(function (row, y) {
      var tr = el("tr", {}, el("th", {text: className(y)}));
      row.forEach(function (v) {
        var td = el("td", {text: v ? String(v) : ""});
        td.style.background = "rgba(31,119,180," + (v / max).toFixed(3) + ")";
        if (v > max / 2) td.style.color = "white";
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    return el("section", {id: "confusion"}, el("h2", {text: "Confusion after Hungarian matching (ACC " + m.acc.toFixed(3) + ")"}), table);
  }

  function scatter(title, colourOfPoint) {
    var e = data.embedding, size = 420, pad = 8;
    var canvas = el("canvas", {width: size, height: size, "class": "embedding"});
    var ctx = canvas.getContext("2d"), px = [], py = [];
    e.index.forEach(function (i, j) {
      px.push(pad + e.x[j] * (size - 2 * pad));
      py.push(pad + (1 - e.y[j]) * (size - 2 * pad));
      ctx.fillStyle = colourOfPoint(i);
      ctx.fillRect(px[j] - 1.5, py[j] - 1.5, 3, 3);
    });
    var tip = el("div", {"class": "tip"});
    var box = el("figure", {"class": "scatter"}, canvas, tip, el("figcaption", {text: title}));
    canvas.addEventListener("mousemove", function (event) {
      var r = canvas.getBoundingClientRect(), x = event.clientX - r.left, y = event.clientY - r.top;
      var best = -1, bestD = 64;
      for (var j = 0; j < px.length; j++) {
        var d = (px[j] - x) * (px[j] - x) + (py[j] - y) * (py[j] - y);
        if (d < bestD) { best = j; bestD = d; }
      }
      tip.innerHTML = "";
      if (best < 0) { tip.style.display = "none"; return; }
      var i = e.index[best];
      tip.appendChild(thumb(i));
      tip.appendChild(el("div", {text: describe(i)}));
      tip.style.display = "block";
      tip.style.left = (px[best] + 12) + "px";
      tip.style.top = (py[best] + 12) + "px";
    });
    canvas.addEventListener("mouseleave", function () { tip.style.display = "none"; });
    return box;
  }

  function embedding() {
    var section = el("section", {id: "embedding"}, el("h2", {text: "2-D embedding of the features (t-SNE, " +
      data.embedding.index.length + " images; hover a point to see it)"}));
    var row = el("div", {"class": "row"});
    row.appendChild(scatter("coloured by cluster" + (data.labels ? " (each in its matched class's colour)" : ""),
      function (i) { return colour(data.colour[clusterOf[i]]); }));
    if (data.labels) {
      row.appendChild(scatter("coloured by class", function (i) { return data.labels[i] < 0 ? "#ccc" : colour(data.labels[i]); }));
    }
    section.appendChild(row);
    return section;
  }

  function chart(title, series, xLabel) {
    var w = 520, h = 260, l = 48, r = 12, t = 24, b = 32, ns = "http://www.w3.org/2000/svg";
    series = Object.fromEntries(Object.entries(series).map(function (e) {
      return [e[0], e[1].filter(function (p) { return p[1] !== null; })];  // a NaN came as null
    }).filter(function (e) { return e[1].length; }));
    var names = Object.keys(series), xs = [], ys = [];
    if (!names.length) return el("p", {text: title + ": no finite values"});
    names.forEach(function (n) { series[n].forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) y1 = y0 + 1;
    function X(v) { return l + (v - x0) / (x1 - x0) * (w - l - r); }
    function Y(v) { return h - b - (v - y0) / (y1 - y0) * (h - t - b); }
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("class", "chart");
    function add(tag, attrs, text) {
      var node = document.createElementNS(ns, tag);
      Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
      if (text !== undefined) node.textContent = text;
      svg.appendChild(node);
      return node;
    }
    add("line", {x1: l, y1: h - b, x2: w - r, y2: h - b, stroke: "#888"});
    add("line", {x1: l, y1: t, x2: l, y2: h - b, stroke: "#888"});
    [[x0, X(x0)], [x1, X(x1)]].forEach(function (p) { add("text", {x: p[1], y: h - b + 14, "text-anchor": "middle"}, fmt(p[0])); });
    [[y0, Y(y0)], [y1, Y(y1)]].forEach(function (p) { add("text", {x: l - 4, y: p[1] + 4, "text-anchor": "end"}, fmt(p[0])); });
    add("text", {x: (l + w - r) / 2, y: h - 4, "text-anchor": "middle"}, xLabel);
    add("text", {x: l, y: 14}, title);
    names.forEach(function (n, s) {
      var pts = series[n].map(function (p) { return X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1); }).join(" ");
      add("polyline", {points: pts, fill: "none", stroke: colour(s), "stroke-width": 1.5});
    });
    var legend = el("ul", {"class": "legend"});
    names.forEach(function (n, s) {
      var item = el("li", {}, el("span", {"class": "swatch"}));
      item.firstChild.style.background = colour(s);
      item.appendChild(document.createTextNode(n));
      legend.appendChild(item);
    });
    return el("figure", {"class": "plot"}, svg, legend);
  }

  function curves() {
    var losses = {}, quality = {};
    Object.keys(data.curves).sort().forEach(function (n) {
      (n.indexOf("train/loss") === 0 ? losses : quality)[n] = data.curves[n];
    });
    var row = el("div", {"class": "row"});
    if (Object.keys(losses).length) row.appendChild(chart("losses", losses, "epoch"));
    if (Object.keys(quality).length) row.appendChild(chart("clustering quality (silhouette is label-free; the rest read labels, reported only)", quality, "epoch"));
    return el("section", {id: "curves"}, el("h2", {text: "Training curves"}), row);
  }

  function kSelection() {
    var s = {};
    s[data.k_selection.criterion] = data.k_selection.scores;
    return el("section", {id: "k-selection"}, el("h2", {text: "Number of clusters, chosen without labels: k = " + data.k_selection.chosen}),
      chart(data.k_selection.criterion + " against k", s, "k"));
  }

  var main = document.getElementById("report");
  main.appendChild(summary());
  main.appendChild(clusters());
  if (data.confusion) main.appendChild(confusion());
  if (data.embedding) main.appendChild(embedding());
  if (Object.keys(data.curves).length) main.appendChild(curves());
  if (data.k_selection) main.appendChild(kSelection());
  document.body.setAttribute("data-errors", String(errors));
  document.body.setAttribute("data-clusters", String(document.querySelectorAll("section.cluster").length));
  document.body.setAttribute("data-rendered", "1");
})();
