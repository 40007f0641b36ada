/* Kvadrupel admin: a little progressive enhancement, no framework.
 *
 *  form[data-fetch="#target"]  submit with fetch, put the server-rendered fragment in #target
 *  [data-autoload="url"]        fill the element with the fragment at url once the page loads
 *  [data-poll="url"]            replace the element with the fragment at url every 2 s
 *  form[data-confirm="text"]    ask before submitting
 *
 * Fragments are rendered (and escaped) by the server's templates; this file never
 * builds HTML from data itself.
 */
(function () {
  "use strict";
  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function request(url, options) {
    options = options || {};
    options.headers = Object.assign({"X-Requested-With": "fetch", "X-CSRF-Token": csrf}, options.headers || {});
    options.credentials = "same-origin";
    return fetch(url, options).then(function (resp) {
      if (resp.status === 401) { window.location.reload(); throw new Error("signed out"); }
      return resp.text().then(function (text) { return {ok: resp.ok, status: resp.status, text: text}; });
    });
  }
  window.kvRequest = request;

  function fill(target, html) {
    target.innerHTML = html;
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) { ev.preventDefault(); return; }
    var sel = form.dataset.fetch;
    if (!sel) return;
    ev.preventDefault();
    var target = document.querySelector(sel);
    var button = form.querySelector('button[type="submit"]');
    if (button) button.disabled = true;
    target.classList.add("loading");
    var method = (form.getAttribute("method") || "get").toUpperCase();
    var data = new FormData(form);
    var url = form.action, opts = {method: method};
    if (method === "GET") { url += (url.indexOf("?") < 0 ? "?" : "&") + new URLSearchParams(data).toString(); }
    else { opts.body = data; }
    request(url, opts).then(function (r) { fill(target, r.text); })
      .catch(function (e) { target.textContent = "Request failed: " + e.message; })
      .finally(function () { if (button) button.disabled = false; target.classList.remove("loading"); });
  });

  function autoload() {
    document.querySelectorAll("[data-autoload]").forEach(function (el) {
      request(el.dataset.autoload).then(function (r) { fill(el, r.text); });
    });
  }

  function poll() {
    var el = document.querySelector("[data-poll]");
    if (!el) return;
    setTimeout(function () {
      request(el.dataset.poll).then(function (r) {
        if (r.ok) { el.outerHTML = r.text; }
        poll();
      }).catch(function () { setTimeout(poll, 5000); });
    }, 2000);
  }

  document.addEventListener("DOMContentLoaded", function () { autoload(); poll(); });
})();
