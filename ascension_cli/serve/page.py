"""The page `ascension serve` shows at ``/``: drop or take a photo, see what it is.

Plain HTML, CSS and a little JavaScript, no build step and no CDN: it works on a shop floor
with no internet, and on a phone (the file input opens the camera).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Which item is this?</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f3b57;color:#fff;padding:14px 20px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;font-size:13px;opacity:.85}main{padding:20px;max-width:900px;margin:auto}
#drop{display:block;border:3px dashed #8aa;border-radius:12px;padding:28px;text-align:center;
background:#fff;cursor:pointer}#drop.over{background:#eef6ff;border-color:#2e86c1}
#drop input{display:none}#drop b{font-size:18px}#answer{margin-top:20px;display:none}
#query{width:160px;height:160px;object-fit:contain;background:#fff;border:1px solid #ccc}
.verdict{display:flex;gap:20px;align-items:center}.verdict h2{margin:0;font-size:28px}
.unknown{color:#c0392b}.matches{display:flex;flex-wrap:wrap;gap:10px;margin-top:16px}
.match{background:#fff;border:1px solid #ddd;border-radius:8px;padding:6px;width:130px;
text-align:center;font-size:13px}.match img{width:118px;height:118px;object-fit:contain}
#status{color:#666;margin-top:10px;min-height:1em}
</style></head><body>
<header><h1>Which item is this?</h1><p id="info">loading the catalogue...</p></header>
<main>
<label id="drop"><b>Drop a photo here, or tap to take or choose one</b>
<input id="photo" type="file" accept="image/*" capture="environment"></label>
<div id="status"></div>
<section id="answer"><div class="verdict"><img id="query" alt="your photo">
<div><h2 id="predicted"></h2><p id="score"></p></div></div>
<div class="matches" id="matches"></div></section>
</main>
<script>
const $ = id => document.getElementById(id);
fetch('info').then(r => r.json()).then(i => {
  $('info').textContent = `${i.items} items in ${i.classes} classes; model ${i.model}`;
});
async function ask(file) {
  $('status').textContent = 'searching...';
  $('query').src = URL.createObjectURL(file);
  const form = new FormData();
  form.append('image', file, file.name || 'photo.jpg');
  form.append('k', '5');
  const response = await fetch('search', {method: 'POST', body: form});
  const body = await response.json();
  if (!response.ok) { $('status').textContent = body.error; $('answer').style.display = 'none';
    return; }
  const result = body.results[0];
  $('predicted').textContent = result.unknown ? 'not in the catalogue'
    : (result.predicted || '-');
  $('predicted').className = result.unknown ? 'unknown' : '';
  const best = result.matches.length ? result.matches[0].similarity.toFixed(3) : '-';
  $('score').textContent = result.unknown
    ? `nothing is close enough: the best match ${best}, the threshold ${body.threshold.toFixed(3)}`
    : `${Math.round(result.score * 100)}% of the vote` + (result.item && result.item !==
      result.predicted ? `; item ${result.item}` : '');
  $('matches').replaceChildren(...result.matches.map(m => {
    const card = document.createElement('div'); card.className = 'match';
    const image = document.createElement('img'); image.src = `items/${m.id}/image`;
    image.alt = m.class || m.path;
    const text = document.createElement('div');
    const item = m.item && m.item !== m.class ? `${m.item} · ` : '';
    text.textContent = `${item}${m.class || '-'} (${m.similarity.toFixed(3)})`;
    card.append(image, text); return card;
  }));
  $('answer').style.display = 'block';
  $('status').textContent = `queued ${Math.round(body.waited_ms)} ms for a shared batch`;
  document.body.dataset.answered = 'yes';
}
$('photo').addEventListener('change', e => { if (e.target.files[0]) ask(e.target.files[0]); });
const drop = $('drop');
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files[0]) ask(e.dataTransfer.files[0]); });
</script></body></html>
"""
