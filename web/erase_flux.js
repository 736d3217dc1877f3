// Erase Flux front end (served by ComfyUI from WEB_DIRECTORY; plain ES module, no build step).
//   * Attention Map Inspector: the prompt's words as clickable chips; a click sets `word`, shift-click appends
//     (a phrase); chips covered by the current `word` are highlighted, exactly as the node matches it.
//   * Merge Erase LoRAs: the effective weight of each used slot, live (w / Σw in `normalized` mode), with warnings.
// Only our two node types are touched; every hook wrapped here calls the previous one; styles are inline.
import { app } from "../../scripts/app.js";

const INSPECT = "EraseFlux_AttentionInspect";
const MERGE = "EraseFlux_MergeLoras";
const SLOTS = 4; // lora_1 … lora_4 (nodes/merge.py)
const LINKED = ["lora_a", "lora_b"]; // optional linked LoRA names, merged with weight 1
const NONE = "none";
const MAX_CHIPS = 300;
const WORD = "[\\p{L}\\p{N}_]"; // one character of Python's \w, which erase_core.tokens.word_spans uses

// ---- pure helpers (exported for tests) -----------------------------------------------------------------------

/** The prompt's words with their character spans: runs of word characters; spaces and punctuation are dropped. */
export function promptWords(prompt) {
  return [...String(prompt ?? "").matchAll(new RegExp(`${WORD}+`, "gu"))]
    .map((m) => ({ text: m[0], start: m.index, end: m.index + m[0].length }));
}

/** Spans of every whole-word, case-insensitive occurrence of a word or phrase (mirrors erase_core.tokens.word_spans). */
export function phraseSpans(prompt, phrase) {
  const parts = String(phrase ?? "").split(/\s+/).filter(Boolean);
  if (!parts.length) return [];
  const esc = (s) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
  const re = new RegExp(`(?<!${WORD})${parts.map(esc).join("\\s+")}(?!${WORD})`, "giu");
  return [...String(prompt ?? "").matchAll(re)].map((m) => [m.index, m.index + m[0].length]);
}

/**
 * Effective merge weights, as nodes/merge.py + erase_core.merge apply them.
 * slots: [{lora, weight}] for lora_1 … lora_4; linked: how many of lora_a / lora_b are connected (weight 1 each).
 * Returns {mode, values (null for an unused slot), linked (their effective weights), sum, warnings}.
 */
const SHARE_MODES = ["normalized", "closed_form", "distill"]; // modes whose weights are shares (≥ 0), as in merge.py

export function effectiveWeights(slots, mode, linked = 0) {
  const raw = slots.map((s) => (s.lora && s.lora !== NONE ? Number(s.weight) : null));
  const all = [...raw.filter((w) => w !== null), ...Array(linked).fill(1)];
  const sum = all.reduce((a, b) => a + b, 0);
  const normalized = mode === "normalized";
  const scale = (w) => (w === null ? null : normalized ? (sum !== 0 ? w / sum : NaN) : w);
  const warnings = [];
  if (all.length < 2) warnings.push("choose at least two LoRAs to merge");
  if (SHARE_MODES.includes(mode) && all.some((w) => w < 0)) warnings.push(`${mode} needs weights ≥ 0 (use sum or concat for signed weights)`);
  if (normalized && all.length && Math.abs(sum) < 1e-12) warnings.push("weights sum to 0: normalized weights are undefined");
  else if (all.length && all.every((w) => w === 0)) warnings.push("all weights are 0: the merge would be empty");
  return { mode, values: raw.map(scale), linked: Array(linked).fill(1).map(scale), sum, warnings };
}

// ---- small DOM / widget utilities ----------------------------------------------------------------------------

const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);
const isLinked = (node, name) => node.inputs?.some((i) => i.name === name && i.link != null) ?? false;

function el(tag, css, text) {
  const e = document.createElement(tag);
  if (css) e.style.cssText = css;
  if (text != null) e.textContent = text;
  return e;
}

/** Set a widget's value the way a user edit does (callback, onWidgetChanged, graph version). */
function setWidgetValue(node, widget, value) {
  if (widget.setValue && app.canvas) widget.setValue(value, { e: undefined, node, canvas: app.canvas });
  else { widget.value = value; widget.callback?.(widget.value, app.canvas, node); }
  node.setDirtyCanvas?.(true, true);
}

/** Call `after` whenever the widget's callback fires (keeps any existing callback first). */
function afterCallback(widget, after) {
  if (!widget) return;
  const prev = widget.callback;
  widget.callback = function (...args) {
    const r = prev?.apply(this, args);
    after();
    return r;
  };
}

/** A non-serialised DOM widget at the end of the node whose height follows its content (up to maxHeight). */
function addPanel(node, name, maxHeight) {
  const outer = el("div", `overflow-y:auto;box-sizing:border-box;font:12px sans-serif;color:var(--input-text,#ddd);`);
  const inner = el("div", "padding:2px 0;");
  outer.appendChild(inner);
  let height = 24;
  const widget = node.addDOMWidget(name, "erase_flux_panel", outer, {
    serialize: false, hideOnZoom: true, margin: 6,
    getValue: () => "", setValue: () => {},
    getMinHeight: () => height, getMaxHeight: () => height,
  });
  widget.serialize = false; // neither in the workflow's widgets_values nor in the prompt
  const fit = () => {
    if (!inner.offsetHeight) return; // detached or hidden: the ResizeObserver calls again once laid out
    const h = Math.min(maxHeight, inner.offsetHeight + 12);
    if (h === height) return;
    height = h;
    const need = node.computeSize?.();
    if (need && node.size) node.setSize([node.size[0], Math.max(node.size[1], need[1])]);
    node.setDirtyCanvas?.(true, true);
  };
  const ro = new ResizeObserver(() => fit()); // re-fit once attached, and when chips re-wrap on a resize
  ro.observe(inner);
  const onRemove = widget.onRemove;
  widget.onRemove = function (...args) { ro.disconnect(); return onRemove?.apply(this, args); };
  return { widget, inner, fit };
}

/** Wrap prototype hooks once per node type; `refresh` runs on creation, load, connection changes and each draw. */
function hook(nodeType, setup) {
  const proto = nodeType.prototype;
  const chain = (key, fn) => {
    const prev = proto[key];
    proto[key] = function (...args) {
      const r = prev?.apply(this, args);
      fn.call(this, ...args);
      return r;
    };
  };
  chain("onNodeCreated", function () { setup(this); });
  chain("onConfigure", function () { this.__eraseFluxRefresh?.(true); });
  chain("onConnectionsChange", function () { this.__eraseFluxRefresh?.(true); });
  chain("onDrawForeground", function () { this.__eraseFluxRefresh?.(false); }); // cheap: compares a key
}

// ---- Attention Map Inspector: word chips ---------------------------------------------------------------------

function setupInspect(node) {
  const promptW = widgetOf(node, "prompt");
  const wordW = widgetOf(node, "word");
  if (!promptW || !wordW) return;
  const panel = addPanel(node, "erase_flux_words", 120);
  panel.inner.style.cssText += "display:flex;flex-wrap:wrap;gap:3px;";
  let key = null;

  node.__eraseFluxRefresh = (force) => {
    const linked = isLinked(node, "prompt");
    const prompt = String(promptW.value ?? "");
    const word = String(wordW.value ?? "").trim();
    const k = `${linked}\u0000${word}\u0000${prompt}`;
    if (!force && k === key) return;
    key = k;
    const box = panel.inner;
    box.replaceChildren();
    const words = linked ? [] : promptWords(prompt).slice(0, MAX_CHIPS);
    const spans = phraseSpans(prompt, word);
    const hit = (w) => spans.some(([s, e]) => w.start < e && s < w.end);
    node.__eraseFluxWords = words.map((w) => ({ text: w.text, selected: hit(w) }));
    if (linked || !words.length) {
      box.appendChild(el("span", "opacity:.6", linked ? "prompt comes from a link: no word chips" : "type a prompt to pick a word"));
    }
    for (const w of words) {
      const on = hit(w);
      const chip = el("button", "cursor:pointer;border-radius:9px;padding:1px 7px;font:inherit;line-height:16px;" +
        (on ? "background:var(--p-primary-color,#3b82f6);color:#fff;border:1px solid transparent;"
            : "background:var(--comfy-input-bg,#222);color:inherit;border:1px solid var(--border-color,#555);"), w.text);
      chip.type = "button";
      chip.title = "click: inspect this word · shift-click: append it (a phrase)";
      chip.dataset.word = w.text;
      if (on) chip.dataset.selected = "1";
      chip.addEventListener("click", (e) => {
        const cur = String(wordW.value ?? "").trim();
        setWidgetValue(node, wordW, e.shiftKey && cur ? `${cur} ${w.text}` : w.text);
      });
      box.appendChild(chip);
    }
    if (word && !linked && words.length && !spans.length) {
      box.appendChild(el("span", "color:var(--error-text,#f66);width:100%", `“${word}” is not a whole word/phrase of the prompt`));
    }
    panel.fit();
  };
  afterCallback(promptW, () => node.__eraseFluxRefresh(false)); // fired on every keystroke in the textarea
  afterCallback(wordW, () => node.__eraseFluxRefresh(false));
  node.__eraseFluxRefresh(true);
}

// ---- Merge Erase LoRAs: live effective weights ---------------------------------------------------------------

function setupMerge(node) {
  const slots = Array.from({ length: SLOTS }, (_, i) => [widgetOf(node, `lora_${i + 1}`), widgetOf(node, `weight_${i + 1}`)]);
  const modeW = widgetOf(node, "mode");
  if (!modeW || slots.some(([l, w]) => !l || !w)) return;
  const panel = addPanel(node, "erase_flux_weights", 140);
  let key = null;
  const fmt = (v) => (Number.isFinite(v) ? v.toFixed(3) : "—");

  node.__eraseFluxRefresh = (force) => {
    const state = slots.map(([l, w]) => ({ lora: l.value, weight: w.value }));
    const linked = LINKED.filter((n) => isLinked(node, n));
    const k = JSON.stringify([state, modeW.value, linked]);
    if (!force && k === key) return;
    key = k;
    const res = effectiveWeights(state, modeW.value, linked.length);
    node.__eraseFluxNormalized = res;
    const box = panel.inner;
    box.replaceChildren();
    const row = (label, name, value) => {
      const r = el("div", "display:flex;gap:6px;white-space:nowrap;");
      r.append(el("span", "opacity:.7;min-width:50px", label),
        el("span", "flex:1;overflow:hidden;text-overflow:ellipsis", name),
        el("b", "font-variant-numeric:tabular-nums", value));
      r.dataset.value = String(value);
      box.appendChild(r);
    };
    const head = res.mode === "normalized" ? `effective weight (w / Σw, Σw = ${fmt(res.sum)})` : `effective weight (${res.mode}: as given)`;
    box.appendChild(el("div", "opacity:.7;margin-bottom:2px", head));
    res.values.forEach((v, i) => { if (v !== null) row(`lora_${i + 1}`, String(state[i].lora), `×${fmt(v)}`); });
    res.linked.forEach((v, i) => row(linked[i], "(linked)", `×${fmt(v)}`));
    for (const w of res.warnings) box.appendChild(el("div", "color:var(--error-text,#f66)", `⚠ ${w}`));
    panel.fit();
  };
  for (const [l, w] of slots) { afterCallback(l, () => node.__eraseFluxRefresh(false)); afterCallback(w, () => node.__eraseFluxRefresh(false)); }
  afterCallback(modeW, () => node.__eraseFluxRefresh(false));
  node.__eraseFluxRefresh(true);
}

app.registerExtension({
  name: "erase_flux.web",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === INSPECT) hook(nodeType, setupInspect);
    else if (nodeData?.name === MERGE) hook(nodeType, setupMerge);
  },
});
