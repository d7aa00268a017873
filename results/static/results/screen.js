/*
 * The results screen inside the Bitrix24 frame. Without JavaScript the list shows and "Add result"
 * posts a plain form; with it, every action happens in place:
 *  - forms are sent with fetch, with the frame token in the X-Frame-Token header (no cookies);
 *  - a change's answer carries only what changed (the new item, or the change's state), laid
 *    over the list the person has: a busy Bitrix24 never empties the screen;
 *  - queued changes are polled until they turn Saved / Not saved, then the list is read again
 *    and shown if Bitrix24 gives it;
 *  - an expired frame token is renewed with fresh auth from the Bitrix24 frame (refreshAuth),
 *    or the person is told to reopen the app.
 */
(function () {
  "use strict";
  var screen = document.querySelector("main.screen");
  if (!screen) return;
  var token = screen.getAttribute("data-frame-token");
  var POLL_MS = 1500;
  var pollTimer = null;

  if (window.B24Frame) window.B24Frame.autoFit();

  function message(text, kind) {
    var box = document.querySelector("#results") || screen;
    var old = box.querySelector(".message.js-message");
    if (old) old.remove();
    var p = document.createElement("p");
    p.className = "message js-message " + (kind || "error");
    p.setAttribute("role", kind === "notice" ? "status" : "alert");
    p.textContent = text;
    box.insertBefore(p, box.firstChild);
  }

  function renewSession() {
    if (!window.B24Frame || !window.B24Frame.available) return Promise.reject(new Error("no frame"));
    return window.B24Frame.refreshAuth().then(function (auth) {
      if (!auth || !auth.AUTH_ID) throw new Error("no auth");
      var body = new FormData();
      body.append("AUTH_ID", auth.AUTH_ID);
      body.append("REFRESH_ID", auth.REFRESH_ID || "");
      body.append("AUTH_EXPIRES", auth.AUTH_EXPIRES || "");
      return fetch(screen.getAttribute("data-session-url"), {
        method: "POST", body: body, credentials: "omit",
        headers: {"X-Frame-Token": token, "Accept": "application/json"}
      });
    }).then(function (response) {
      if (!response.ok) throw new Error("renewal refused");
      return response.json();
    }).then(function (data) { token = data.token; });
  }

  /* Read a response's JSON once, whatever its status: {ok, status, data}. */
  function readJson(response) {
    return response.json().catch(function () { return {}; }).then(function (data) {
      return {ok: response.ok, status: response.status, data: data || {}};
    });
  }

  /* fetch with the frame token, read once into {ok, status, data}; on an expired token renew
     it once and repeat. */
  function call(url, options, renewed) {
    options = options || {};
    var headers = {"X-Frame-Token": token, "Accept": "application/json"};
    var init = {method: options.method || "GET", body: options.body, credentials: "omit", headers: headers};
    return fetch(url, init).then(readJson).then(function (answer) {
      if (answer.status !== 401 || renewed || answer.data.error !== "frame_expired") return answer;
      return renewSession().then(function () {
        return call(url, options, true);
      }, function () {
        message(screen.getAttribute("data-msg-expired"));
        throw new Error("expired");
      });
    });
  }

  function swap(html) {
    var current = document.querySelector("#results");
    var holder = document.createElement("div");
    holder.innerHTML = html;
    var fresh = holder.querySelector("#results");
    if (!fresh) return;
    if (current) current.replaceWith(fresh); else screen.appendChild(fresh);
    schedulePoll();
  }

  function announce(text) {
    var region = document.getElementById("announcer");
    if (!region || !text) return;
    region.textContent = "";
    setTimeout(function () { region.textContent = text; }, 50);
  }

  function fragment(html) {
    var holder = document.createElement("template");
    holder.innerHTML = html.trim();
    return holder.content.firstElementChild;
  }

  /* Lay a change's new state over the item it belongs to, in the list the person has. */
  function showChange(item, change) {
    var badge = change.html ? fragment(change.html) : null;
    var old = item.querySelector(".change");
    if (badge) {
      if (old) old.replaceWith(badge);
      else item.querySelector(".text").insertAdjacentElement("afterend", badge);
    }
    item.setAttribute("data-change-id", change.id);
    item.setAttribute("data-change-state", change.state);
  }

  function itemByChange(changeId) {
    return document.querySelector('#results li.result[data-change-id="' + changeId + '"]');
  }

  /* The answer to an add, edit, delete or retry: only what changed, laid over the list. */
  function applyChange(form, data) {
    var list = document.querySelector("#results .result-list");
    var item = itemOf(form) || (data.change && itemByChange(data.change.id));
    if (data.item_html && list) {
      var fresh = fragment(data.item_html);
      var empty = list.querySelector("li.empty");
      if (empty) empty.remove();
      if (item && item.getAttribute("data-change-id") === String(data.change.id)) item.replaceWith(fresh);
      else list.insertBefore(fresh, list.firstChild);
      item = fresh;
    }
    if (!item) return;
    var change = data.change;
    showChange(item, change);
    if (change.action === "update" && typeof data.text === "string") {
      item.querySelector(".text").innerText = data.text;
      item.setAttribute("data-text", data.text);
      var box = item.querySelector("form.editor");
      if (box) box.remove();  // made again from the new text on the next Edit
    }
    if (change.action === "delete" && change.state !== "failed") {
      item.classList.add("is-deleting");
      item.querySelectorAll(".item-actions, form.editor, form.confirm-delete").forEach(function (el) { el.remove(); });
    } else {
      hideForms(item);
      var opener = item.querySelector('[data-action="edit"]');
      if (change.action === "update" && opener) opener.focus();
    }
    announce(data.notice);
  }

  function send(form) {
    var body = new FormData(form);
    body.delete("frame_token");
    var buttons = form.querySelectorAll("button");
    buttons.forEach(function (b) { b.disabled = true; });
    return call(form.action, {method: "POST", body: body}).then(function (answer) {
      var data = answer.data;
      if (!answer.ok) {
        message(data.error || data.message || screen.getAttribute("data-msg-failed"));
        return;
      }
      applyChange(form, data);
      if (form.classList.contains("add")) {
        form.reset();
        var box = document.querySelector("#new-result-text");
        if (box) box.focus();
      }
      if (data.change && data.change.state === "saved") refreshList(false);
      schedulePoll();
    }).catch(function (error) {
      if (String(error && error.message) !== "expired") message(screen.getAttribute("data-msg-failed"));
    }).finally(function () {
      buttons.forEach(function (b) { b.disabled = false; });
    });
  }

  /* Read the list again and show it. A list Bitrix24 would not give (busy, down) never
     replaces the one on the screen: the person keeps what they see, told why when they asked. */
  function refreshList(asked) {
    var results = document.querySelector("#results");
    if (!results) return Promise.resolve();
    var url = screen.getAttribute("data-task-url") + "?task=" + encodeURIComponent(results.getAttribute("data-task"));
    return call(url).then(function (answer) {
      var data = answer.data;
      if (answer.ok && data.html) { swap(data.html); return; }
      if (asked) message(data.unavailable || data.message || screen.getAttribute("data-msg-failed"));
    }).catch(function () {
      if (asked) message(screen.getAttribute("data-msg-failed"));
    });
  }

  function pendingIds() {
    return Array.prototype.map.call(
      document.querySelectorAll('#results [data-change-state="queued"]'),
      function (el) { return el.getAttribute("data-change-id"); }
    );
  }

  function schedulePoll() {
    if (pollTimer) clearTimeout(pollTimer);
    if (pendingIds().length) pollTimer = setTimeout(poll, POLL_MS);
  }

  function poll() {
    var ids = pendingIds();
    if (!ids.length) return;
    var url = screen.getAttribute("data-changes-url") + "?ids=" + ids.join(",");
    call(url).then(function (answer) {
      var settled = false;
      (answer.data.changes || []).forEach(function (change) {
        if (change.state === "queued") return;
        var item = itemByChange(change.id);
        if (!item) return;
        settled = true;
        showChange(item, change);
        if (change.action === "add" && change.result_id) item.setAttribute("data-result-id", change.result_id);
        announce(change.label);
      });
      if (settled) refreshList(false);
      schedulePoll();
    }).catch(function () { schedulePoll(); });
  }

  function itemOf(el) { return el.closest("li.result"); }

  /* The editor or delete confirmation of a result: made on first use from the list's shared
     <template>, with the result's id and text (data-text holds it as Bitrix24 stores it). */
  function formFor(item, action) {
    var id = item.getAttribute("data-result-id");
    var existing = document.getElementById(action + "-" + id);
    if (existing) return existing;
    var template = document.getElementById(action === "edit" ? "editor-template" : "delete-template");
    if (!id || !template) return null;
    var form = template.content.firstElementChild.cloneNode(true);
    var text = item.getAttribute("data-text") || "";
    form.id = action + "-" + id;
    form.action = template.getAttribute("data-action-url").replace("/0/", "/" + id + "/");
    form.querySelector("input[name=text_before]").value = text;
    var box = form.querySelector("textarea");
    if (box) {
      box.id = "edit-text-" + id;
      box.value = text;
      form.querySelector("label").htmlFor = box.id;
    }
    item.appendChild(form);
    return form;
  }

  /* Close an editor or a delete confirmation and give focus back to the button that opened it. */
  function closeForm(form) {
    if (!form) return;
    var item = itemOf(form);
    hideForms(item);
    var opener = item.querySelector('[aria-controls="' + form.id + '"]');
    if (opener) opener.focus();
  }

  function hideForms(item) {
    item.querySelectorAll("form.editor, form.confirm-delete").forEach(function (f) { f.hidden = true; });
    var actions = item.querySelector(".item-actions");
    if (actions) actions.hidden = false;
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button) return;
    var item = itemOf(button);
    if (!item) return;
    var action = button.getAttribute("data-action");
    if (action === "cancel") {
      closeForm(button.closest("form"));
      return;
    }
    var target = formFor(item, action);
    if (!target) return;
    hideForms(item);
    item.querySelector(".item-actions").hidden = true;
    target.hidden = false;
    var field = target.querySelector("textarea") || target.querySelector("button[type=submit]");
    if (field) field.focus();
  });

  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape") return;
    var form = event.target.closest && event.target.closest("form.editor, form.confirm-delete");
    if (form) closeForm(form);
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.closest("#results") && !form.classList.contains("picker")) return;
    event.preventDefault();
    var text = form.querySelector("textarea");
    if (text && !text.value.trim()) {
      message(screen.getAttribute("data-msg-required"));
      text.focus();
      return;
    }
    if (form.classList.contains("reload")) {
      refreshList(true);
      return;
    }
    if (form.classList.contains("picker")) {
      var task = form.querySelector("input[name=task]").value.trim();
      call(screen.getAttribute("data-task-url") + "?task=" + encodeURIComponent(task))
        .then(function (answer) {
          var data = answer.data;
          if (data.html) swap(data.html);
          else message(data.message || data.error || screen.getAttribute("data-msg-failed"));
        }, function (error) {
          if (String(error && error.message) !== "expired") message(screen.getAttribute("data-msg-failed"));
        });
      return;
    }
    send(form);
  });

  schedulePoll();
})();
