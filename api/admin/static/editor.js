/* The rule editor: CodeMirror (Python mode, line numbers), live validation with
 * errors on their line, the examples table, example runs and template previews.
 * Every check is made by the server (RuleService.validate / run_examples). */
(function () {
  "use strict";
  var form = document.getElementById("rule-form");
  if (!form) return;
  var textarea = document.getElementById("source");
  var cm = CodeMirror.fromTextArea(textarea, {
    mode: {name: "python", version: 3}, lineNumbers: true, indentUnit: 4, tabSize: 4,
    indentWithTabs: false, matchBrackets: true, viewportMargin: Infinity,
    extraKeys: {Tab: function (c) { c.replaceSelection("    "); }}
  });
  window.kvEditor = cm;
  var marks = [];
  var box = document.getElementById("validation");

  function clearMarks() {
    marks.forEach(function (m) {
      if (m.widget) m.widget.clear();
      cm.removeLineClass(m.line, "background", "cm-error-line");
    });
    marks = [];
  }

  function show(problems) {
    clearMarks();
    box.textContent = "";
    if (!problems.length) {
      var ok = document.createElement("p");
      ok.className = "ok-text";
      ok.textContent = "✔ No problems";
      ok.dataset.testid = "validation-ok";
      box.appendChild(ok);
      return;
    }
    var ul = document.createElement("ul");
    ul.className = "problems";
    problems.forEach(function (p) {
      var li = document.createElement("li");
      li.textContent = p.message;
      if (p.line) li.dataset.line = p.line;
      li.dataset.field = p.field || "";
      ul.appendChild(li);
      if (p.field === "source" && p.line && p.line <= cm.lineCount()) {
        var line = p.line - 1;
        cm.addLineClass(line, "background", "cm-error-line");
        var w = document.createElement("div");
        w.className = "cm-error-widget";
        w.dataset.line = p.line;
        w.textContent = "▲ " + p.message;
        marks.push({line: line, widget: cm.addLineWidget(line, w, {coverGutter: false})});
      }
    });
    box.appendChild(ul);
  }

  var timer = null, seq = 0;
  function validate() {
    cm.save();
    var mine = ++seq;
    window.kvRequest(form.dataset.validate, {method: "POST", body: new FormData(form)}).then(function (r) {
      if (mine !== seq) return;  // a newer check is on its way
      try { show(JSON.parse(r.text).problems || []); } catch (e) { box.textContent = "Validation failed (" + r.status + ")"; }
    });
  }
  function later() { clearTimeout(timer); timer = setTimeout(validate, 350); }
  cm.on("change", later);
  form.querySelectorAll('input[name^="banner_"], textarea[name^="banner_"], input[name^="email_"], textarea[name^="email_"]')
    .forEach(function (el) { el.addEventListener("input", later); });

  try { show(JSON.parse(document.getElementById("initial-problems").textContent) || []); } catch (e) { /* none */ }
  if (!document.querySelector("#validation .problems")) box.textContent = "";

  form.addEventListener("submit", function () { cm.save(); });

  function fragment(url, targetId) {
    cm.save();
    var target = document.getElementById(targetId);
    target.classList.add("loading");
    window.kvRequest(url, {method: "POST", body: new FormData(form)}).then(function (r) {
      target.innerHTML = r.text;  // rendered and escaped by the server
    }).finally(function () { target.classList.remove("loading"); });
  }

  form.addEventListener("click", function (ev) {
    var btn = ev.target.closest("button[data-action]");
    if (!btn) return;
    var action = btn.dataset.action;
    if (action === "add-example") {
      var tpl = document.getElementById("example-row-template");
      document.getElementById("example-rows").appendChild(tpl.content.cloneNode(true));
    } else if (action === "remove-example") {
      btn.closest("tr").remove();
    } else if (action === "add-variant") {
      var vtpl = document.getElementById("variant-row-template");
      document.getElementById("variant-rows").appendChild(vtpl.content.cloneNode(true));
    } else if (action === "remove-variant") {
      btn.closest(".variant").remove();
    } else if (action === "run-examples") {
      fragment(form.dataset.examples, "example-results");
    } else if (action === "render") {
      fragment(form.dataset.render, "render-result");
    }
  });
})();
