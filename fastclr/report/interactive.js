// The report's interactive parts, on the data build.py embeds (#report-data). Written for this
// page, no library. The loss and its metrics follow fastclr/pretraining/losses.py: unit rows,
// cosine similarity over temperature, each anchor's own column left out, cross-entropy with the
// other view of its image as the target, rank = 1 + the number of other candidates scored at or
// above it (ties count against the positive).
(function () {
  'use strict';
  var dataBlock = document.getElementById('report-data');
  if (!dataBlock) return;
  var D = JSON.parse(dataBlock.textContent);
  var SVGNS = 'http://www.w3.org/2000/svg';

  function $(id) { return document.getElementById(id); }
  function make(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function floats(b64) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }
  function unitRows(flat, dim) {
    var rows = [];
    for (var r = 0; r < flat.length / dim; r++) {
      var v = new Float64Array(dim), norm = 0;
      for (var k = 0; k < dim; k++) { v[k] = flat[r * dim + k]; norm += v[k] * v[k]; }
      norm = Math.max(Math.sqrt(norm), 1e-12);  // F.normalize's eps
      for (k = 0; k < dim; k++) v[k] /= norm;
      rows.push(v);
    }
    return rows;
  }
  // Viridis, the 9 stops of png.py.
  var VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
                 [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  function viridis(v) {
    var t = Math.min(Math.max(v, 0), 1) * 8, i = Math.min(Math.floor(t), 7), f = t - i;
    return 'rgb(' + [0, 1, 2].map(function (c) {
      return Math.round(VIRIDIS[i][c] * (1 - f) + VIRIDIS[i + 1][c] * f);
    }).join(',') + ')';
  }
  function setValue(id, value, text) {
    var e = $(id);
    e.setAttribute('data-value', String(value));
    e.textContent = text;
  }

  // ---------------------------------------------------------------- contrastive playground
  // The batch of B pairs is views [0, B) and [n, n + B) of the 2n embedded views; local row i
  // (first views, then second views) has its positive at i + B (i < B) or i - B.
  function contrast(rows, n, B, t) {
    var idx = [], m = 2 * B, i, k;
    for (i = 0; i < B; i++) idx.push(i);
    for (i = 0; i < B; i++) idx.push(n + i);
    var sim = [];
    for (i = 0; i < m; i++) {
      sim.push(new Float64Array(m));
      for (k = 0; k < m; k++) {
        var a = rows[idx[i]], b = rows[idx[k]], s = 0;
        for (var d = 0; d < a.length; d++) s += a[d] * b[d];
        sim[i][k] = s;
      }
    }
    var loss = 0, top1 = 0, top5 = 0, rankSum = 0, probs = [];
    for (i = 0; i < m; i++) {
      var pos = i < B ? i + B : i - B, max = -Infinity, sum = 0, rank = 1;
      for (k = 0; k < m; k++) if (k !== i) max = Math.max(max, sim[i][k] / t);
      for (k = 0; k < m; k++) if (k !== i) sum += Math.exp(sim[i][k] / t - max);
      var lse = max + Math.log(sum);
      loss += lse - sim[i][pos] / t;
      for (k = 0; k < m; k++) if (k !== i && k !== pos && sim[i][k] / t >= sim[i][pos] / t) rank += 1;
      top1 += rank <= 1 ? 1 : 0;
      top5 += rank <= 5 ? 1 : 0;
      rankSum += rank;
      var p = new Float64Array(m);
      for (k = 0; k < m; k++) p[k] = k === i ? 0 : Math.exp(sim[i][k] / t - lse);
      probs.push(p);
    }
    return {idx: idx, sim: sim, probs: probs, loss: loss / m, top1: top1 / m, top5: top5 / m,
            meanRank: rankSum / m, pairs: B, negatives: m - 2};
  }

  function playground() {
    var P = D.playground, root = $('playground');
    if (!P || !root) return;
    var reps = {h: unitRows(floats(P.h), P.h_dim)};
    if (P.z) reps.z = unitRows(floats(P.z), P.z_dim);
    var slider = $('pg-temp'), batch = $('pg-batch'), rep = $('pg-rep'), canvas = $('pg-matrix');
    var state = {anchor: 0, result: null};
    var SIDE = 448;
    // A split of fewer than 32 images embeds fewer pairs: offer only the batches that fit (all the
    // pairs when even 4 do not), the largest chosen.
    var fits = Array.prototype.filter.call(batch.options, function (o) { return parseInt(o.value, 10) <= P.pairs; });
    if (fits.length < batch.options.length) {
      batch.innerHTML = '';
      if (!fits.length) { fits = [document.createElement('option')]; fits[0].textContent = String(P.pairs); }
      fits.forEach(function (o) { batch.appendChild(o); });
      batch.selectedIndex = fits.length - 1;
    }

    function temperature() { return Math.pow(10, parseFloat(slider.value)); }

    function draw() {
      var t = temperature(), B = Math.min(parseInt(batch.value, 10), P.pairs);
      var r = contrast(reps[rep.value], P.pairs, B, t), m = 2 * B, cell = SIDE / m;
      state.result = r;
      if (state.anchor >= m) state.anchor = 0;
      var ctx = canvas.getContext('2d');
      ctx.clearRect(0, 0, SIDE, SIDE);
      for (var i = 0; i < m; i++) {
        for (var k = 0; k < m; k++) {
          ctx.fillStyle = i === k ? '#bbb' : viridis((r.sim[i][k] + 1) / 2);
          ctx.fillRect(k * cell, i * cell, Math.ceil(cell), Math.ceil(cell));
        }
      }
      ctx.lineWidth = Math.max(1, cell / 8);
      ctx.strokeStyle = '#e8112d';  // the positives: the diagonals of the off-diagonal blocks
      for (i = 0; i < m; i++) ctx.strokeRect(((i + B) % m) * cell + 1, i * cell + 1, cell - 2, cell - 2);
      ctx.strokeStyle = '#fff';
      ctx.lineWidth = 2;
      ctx.strokeRect(1, state.anchor * cell + 1, SIDE - 2, cell - 2);
      canvas.setAttribute('data-batch', String(B));
      setValue('pg-t', t, t.toPrecision(3));
      $('pg-t-label').textContent = t.toPrecision(3);
      setValue('pg-loss', r.loss, r.loss.toFixed(4));
      setValue('pg-pairs', r.pairs, String(r.pairs));
      setValue('pg-negatives', r.negatives, String(r.negatives));
      setValue('pg-top1', r.top1, (100 * r.top1).toFixed(1) + '%');
      setValue('pg-top5', r.top5, (100 * r.top5).toFixed(1) + '%');
      setValue('pg-rank', r.meanRank, r.meanRank.toFixed(3));
      showAnchor();
    }

    function showAnchor() {
      var r = state.result, i = state.anchor, B = r.pairs, m = 2 * B, pos = i < B ? i + B : i - B;
      var p = r.probs[i], svg = $('pg-softmax');
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      var w = 448, h = 150, bw = w / m, top = 0;
      for (var k = 0; k < m; k++) top = Math.max(top, p[k]);
      for (k = 0; k < m; k++) {
        if (k === i) continue;
        var bar = document.createElementNS(SVGNS, 'rect'), bh = (h - 20) * p[k] / top;
        bar.setAttribute('x', String(k * bw + 0.5));
        bar.setAttribute('y', String(h - bh));
        bar.setAttribute('width', String(Math.max(bw - 1, 1)));
        bar.setAttribute('height', String(bh));
        bar.setAttribute('fill', k === pos ? '#2ea043' : '#8a8a8a');
        var title = document.createElementNS(SVGNS, 'title');
        title.textContent = (k === pos ? 'positive' : 'negative') + ' view ' + k + ': p = ' + p[k].toPrecision(3);
        bar.appendChild(title);
        svg.appendChild(bar);
      }
      setValue('pg-anchor-id', i, 'anchor: view ' + i + (i < B ? ' (first view of image ' + i + ')'
                                                            : ' (second view of image ' + (i - B) + ')'));
      setValue('pg-ppos', p[pos], 'p(positive) = ' + p[pos].toPrecision(4));
      var views = $('pg-views'), hard = $('pg-hard');
      views.textContent = '';
      hard.textContent = '';
      [i, pos].forEach(function (v, j) {
        var fig = make('figure', {'data-view': String(r.idx[v])});
        fig.appendChild(make('img', {src: P.thumbs[r.idx[v]], alt: 'view', width: '84', height: '84'}));
        fig.appendChild(make('figcaption', {}, j === 0 ? 'anchor' : 'positive, cos ' + r.sim[i][pos].toFixed(3)));
        views.appendChild(fig);
      });
      var negs = [];
      for (k = 0; k < m; k++) if (k !== i && k !== pos) negs.push(k);
      negs.sort(function (a, b) { return r.sim[i][b] - r.sim[i][a]; });
      negs.slice(0, 5).forEach(function (k) {
        var fig = make('figure', {'data-view': String(r.idx[k])});
        fig.appendChild(make('img', {src: P.thumbs[r.idx[k]], alt: 'negative', width: '60', height: '60'}));
        fig.appendChild(make('figcaption', {}, 'cos ' + r.sim[i][k].toFixed(3)));
        hard.appendChild(fig);
      });
    }

    canvas.addEventListener('click', function (e) {
      var rect = canvas.getBoundingClientRect(), m = 2 * state.result.pairs;
      // Inside the border: the drawn matrix is the client area, not the bounding box.
      var y = (e.clientY - rect.top - canvas.clientTop) / canvas.clientHeight;
      state.anchor = Math.max(0, Math.min(m - 1, Math.floor(y * m)));
      draw();
    });
    slider.addEventListener('input', draw);
    batch.addEventListener('change', draw);
    rep.addEventListener('change', draw);
    if (!P.z) rep.querySelector('option[value="z"]').disabled = true;
    rep.value = P.z ? 'z' : 'h';
    var lt = Math.log10(P.temperature);  // the run's t, inside the slider's range whatever it is
    slider.min = String(Math.min(-2, Math.floor(lt)));
    slider.max = String(Math.max(0, Math.ceil(lt)));
    slider.value = String(lt);
    root.hidden = false;
    draw();
  }

  // ---------------------------------------------------------------- embedding map
  function embeddingMap() {
    var M = D.map, svg = document.querySelector('#map svg');
    if (!M || !svg) return;
    var sheet = new Image();
    sheet.src = M.sprite;
    var points = svg.querySelectorAll('circle[data-i]'), hidden = {};
    var hover = $('map-hover'), nbrs = $('map-neighbours');

    function thumb(i, scale) {
      var c = make('canvas', {width: String(M.size * scale), height: String(M.size * scale), 'data-i': String(i)});
      var ctx = c.getContext('2d');
      ctx.imageSmoothingEnabled = false;
      var draw = function () {
        ctx.drawImage(sheet, (i % M.cols) * M.size, Math.floor(i / M.cols) * M.size, M.size, M.size,
                      0, 0, M.size * scale, M.size * scale);
      };
      if (sheet.complete) draw(); else sheet.addEventListener('load', draw);
      return c;
    }
    function caption(i) {
      return (M.classes.length ? M.classes[M.labels[i]] + ', ' : '') + M.split + ' image ' + M.index[i];
    }
    function countVisible() {
      var n = 0;
      points.forEach(function (p) { if (p.style.display !== 'none') n += 1; });
      setValue('map-visible', n, n + ' of ' + points.length + ' points shown');
    }
    points.forEach(function (p) {
      var i = parseInt(p.getAttribute('data-i'), 10);
      p.addEventListener('mouseenter', function () {
        hover.textContent = '';
        hover.setAttribute('data-i', String(i));
        hover.appendChild(thumb(i, 3));
        hover.appendChild(make('div', {}, caption(i)));
      });
      p.addEventListener('click', function () {
        nbrs.textContent = '';
        nbrs.setAttribute('data-i', String(i));
        nbrs.appendChild(make('div', {}, 'Nearest in h to ' + caption(i) + ':'));
        var row = make('div', {'class': 'thumbs'});
        for (var j = 0; j < M.k; j++) {
          var n = M.neighbours[i * M.k + j], fig = make('figure', {'data-i': String(n)});
          fig.appendChild(thumb(n, 2));
          fig.appendChild(make('figcaption', {}, 'cos ' + M.sims[i * M.k + j].toFixed(3)));
          row.appendChild(fig);
        }
        nbrs.appendChild(row);
      });
    });
    svg.querySelectorAll('g.legend').forEach(function (g) {
      var c = g.getAttribute('data-class');
      g.addEventListener('click', function () {
        hidden[c] = !hidden[c];
        g.style.opacity = hidden[c] ? '0.3' : '1';
        points.forEach(function (p) {
          if (p.getAttribute('data-c') === c) p.style.display = hidden[c] ? 'none' : '';
        });
        countVisible();
      });
    });
    $('map-tools').hidden = false;
    countVisible();
  }

  // ---------------------------------------------------------------- augmentation explorer
  function explorer() {
    var detail = $('aug-detail');
    if (!detail) return;
    document.querySelectorAll('#augment img[data-params]').forEach(function (img) {
      img.addEventListener('mouseenter', function () {
        var p = JSON.parse(img.getAttribute('data-params'));
        detail.setAttribute('data-view', img.getAttribute('data-view'));
        detail.textContent = '';
        var rows = [['crop (x0, y0, w, h)', p.crop.join(', ') + '  (' + (100 * p.crop_share).toFixed(1) + '% of the area)'],
                    ['flip', p.flip ? 'yes' : 'no'],
                    ['colour jitter', p.jitter ? 'brightness ' + p.jitter.brightness + ', contrast ' +
                      p.jitter.contrast + ', saturation ' + p.jitter.saturation + ', hue ' + p.jitter.hue : 'not applied'],
                    ['grayscale', p.grayscale ? 'yes' : 'no'],
                    ['blur sigma', p.blur_sigma > 0 ? String(p.blur_sigma) : 'not applied'],
                    ['solarize', p.solarize ? 'yes' : 'no'],
                    ['erased (x0, y0, w, h; grey level)', p.erase ? p.erase.slice(0, 4).join(', ') + '; ' + p.erase[4] : 'not applied']];
        var table = make('table');
        rows.forEach(function (row) {
          var tr = make('tr');
          tr.appendChild(make('th', {}, row[0]));
          tr.appendChild(make('td', {}, row[1]));
          table.appendChild(tr);
        });
        detail.appendChild(table);
      });
    });
  }

  playground();
  embeddingMap();
  explorer();
})();
