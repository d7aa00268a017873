/*
 * The results screen inside the Bitrix24 frame. Without JavaScript the list shows and "Add result"
 * posts a plain form; with it, every action happens in place:
 *  - forms are sent with fetch, with the frame token in the X-Frame-Token header (no cookies);
 *  - a change's answer carries only what changed (the new item, or the change's state), laid
 *    over the list the person has: a busy Bitrix24 never empties the screen;
 *  - queued changes are polled until they turn Saved / Not saved, then the list is read again
 *    and shown if Bitrix24 gives it. The wait between polls starts at 1.5 s and doubles up to
 *    30 s; polling pauses while the tab is hidden (and polls again when it is shown) and stops
 *    when nothing is queued;
 *  - focus never falls off the page: after an edit it is on the item's Edit button, after a
 *    delete on the next item (or the list's heading), after an add on the new item, and a list
 *    shown again keeps it where it was. One live region (#announcer) says what changed;
 *  - an expired frame token is renewed with fresh auth from the Bitrix24 frame (refreshAuth),
 *    or the person is told to reopen the app.
 */
(function () {
  "use strict";
  var screen = document.querySelector("main.screen");
  if (!screen) return;
  var token = screen.getAttribute("data-frame-token");
  var POLL_FIRST_MS = 1500;
  var POLL_MAX_MS = 30000;
  var pollDelay = POLL_FIRST_MS;
  var pollTimer = null;
  var polling = false;  // a poll's request is on its way: its answer schedules the next one

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
      var body = new URLSearchParams();
      body.append("AUTH_ID", auth.AUTH_ID);
      body.append("REFRESH_ID", auth.REFRESH_ID || "");
      body.append("AUTH_EXPIRES", auth.AUTH_EXPIRES || "");
      return fetch(screen.getAttribute("data-session-url"), {
        method: "POST", body: body, credentials: "omit",
        headers: {"X-Frame-Token": token, "Accept": "application/json"}
      });
    }).then(readJson).then(function (answer) {
      if (!answer.ok || !answer.data.token) throw new Error("renewal refused");
      token = answer.data.token;
    });
  }

  /* Read a response's body once, as text, whatever its status, and parse the JSON from that
     text (an HTML error page reads as no data): {ok, status, data}. */
  function readJson(response) {
    return response.text().catch(function () { return ""; }).then(function (text) {
      var data = null;
      try { data = JSON.parse(text); } catch (e) { data = null; }
      if (!data || typeof data !== "object") data = {};
      return {ok: response.ok, status: response.status, data: data};
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

  /* Move focus to el; an element that takes no focus of its own (a list item, a heading) is
     made focusable by script only (tabindex -1), so Tab never stops on it. */
  function focusOn(el) {
    if (!el) return;
    if (!el.matches("a[href], button, input, textarea, select, [tabindex]")) el.setAttribute("tabindex", "-1");
    el.focus();
  }

  function heading() { return document.querySelector("#results h1"); }

  /* Where focus is inside the list, told so that it can be found again in a list made anew. */
  function focusPlace() {
    var active = document.activeElement;
    var results = document.querySelector("#results");
    if (!active || !results || !results.contains(active)) return null;
    var item = itemOf(active);
    return {
      id: active.id || "",
      result: item ? item.getAttribute("data-result-id") : null,
      change: item ? item.getAttribute("data-change-id") : null,
      action: active.getAttribute("data-action")
    };
  }

  function itemIn(root, place) {
    return (place.result && root.querySelector('li.result[data-result-id="' + place.result + '"]')) ||
      (place.change && root.querySelector('li.result[data-change-id="' + place.change + '"]')) || null;
  }

  function restoreFocus(place, root) {
    if (!place) return;
    var target = place.id ? root.querySelector("#" + CSS.escape(place.id)) : null;
    var item = target ? null : itemIn(root, place);
    if (item) target = (place.action && item.querySelector('[data-action="' + place.action + '"]')) || item;
    focusOn(target || root.querySelector("h1"));
  }

  function swap(html) {
    var current = document.querySelector("#results");
    var holder = document.createElement("div");
    holder.innerHTML = html;
    var fresh = holder.querySelector("#results");
    if (!fresh) return;
    var place = focusPlace();
    var typed = document.querySelector("#new-result-text");
    var freshBox = fresh.querySelector("#new-result-text");
    if (typed && freshBox && current && current.contains(typed)) freshBox.value = typed.value;
    if (current) current.replaceWith(fresh); else screen.appendChild(fresh);
    restoreFocus(place, fresh);
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
    var added = false;
    if (data.item_html && list) {
      var fresh = fragment(data.item_html);
      var empty = list.querySelector("li.empty");
      if (empty) empty.remove();
      if (item && item.getAttribute("data-change-id") === String(data.change.id)) item.replaceWith(fresh);
      else list.insertBefore(fresh, list.firstChild);
      item = fresh;
      added = true;
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
      // Focus goes on to the next result (or the one before it, or the list's heading) before
      // this one loses its buttons, and stays there when the list is shown again without it.
      var next = nextItem(item);
      item.classList.add("is-deleting");
      item.querySelectorAll(".item-actions, form.editor, form.confirm-delete").forEach(function (el) { el.remove(); });
      focusOn(next || heading());
    } else {
      hideForms(item);
      var opener = item.querySelector('[data-action="edit"]');
      if (change.action === "update" && opener) focusOn(opener);
      else if (added || form.closest("li.result")) focusOn(item);
    }
    announce(data.notice);
  }

  function nextItem(item) {
    var others = Array.prototype.filter.call(
      document.querySelectorAll("#results li.result"),
      function (el) { return el === item || !el.classList.contains("is-deleting"); }
    );
    var at = others.indexOf(item);
    return others[at + 1] || others[at - 1] || null;
  }

  function send(form) {
    // Form-encoded, not multipart: the forms carry no files, and it is the smaller body and the
    // cheaper one for the server to parse.
    var body = new URLSearchParams(new FormData(form));
    body.delete("frame_token");
    var buttons = form.querySelectorAll("button");
    buttons.forEach(function (b) { b.disabled = true; });
    return call(form.action, {method: "POST", body: body}).then(function (answer) {
      var data = answer.data;
      if (!answer.ok) {
        message(data.error || data.message || screen.getAttribute("data-msg-failed"));
        return;
      }
      if (form.classList.contains("add")) form.reset();
      applyChange(form, data);
      if (data.change && data.change.state === "saved") refreshList(false);
      pollDelay = POLL_FIRST_MS;  // a new change: its state is asked for soon
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

  function hidden() { return document.visibilityState === "hidden"; }

  /* The next poll, pollDelay from now: none while a poll is on its way (its answer schedules
     the next), while the tab is hidden (showing it polls) or when nothing is queued. */
  function schedulePoll() {
    if (pollTimer) clearTimeout(pollTimer);
    pollTimer = null;
    if (polling || hidden() || !pendingIds().length) return;
    pollTimer = setTimeout(poll, pollDelay);
  }

  function poll() {
    pollTimer = null;
    var ids = pendingIds();
    if (!ids.length || hidden()) return;
    polling = true;
    pollDelay = Math.min(pollDelay * 2, POLL_MAX_MS);
    var url = screen.getAttribute("data-changes-url") + "?ids=" + ids.join(",");
    call(url).finally(function () { polling = false; }).then(function (answer) {
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
    var opener = item.querySelector('[data-action="' + action + '"]');
    if (opener) opener.setAttribute("aria-controls", form.id);  // only once the form exists
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
    item.querySelectorAll("[aria-expanded]").forEach(function (b) { b.setAttribute("aria-expanded", "false"); });
    var actions = item.querySelector(".item-actions");
    if (actions) actions.hidden = false;
  }

  document.addEventListener("visibilitychange", function () {
    if (hidden()) {
      if (pollTimer) clearTimeout(pollTimer);
      pollTimer = null;
    } else if (!polling && pendingIds().length) {
      pollDelay = POLL_FIRST_MS;  // shown again: ask at once what happened meanwhile, then
      poll();                     // back off anew
    }
  });

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
    button.setAttribute("aria-expanded", "true");
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
      var shown = form.querySelector("button[type=submit]");
      if (shown) shown.disabled = true;
      call(screen.getAttribute("data-task-url") + "?task=" + encodeURIComponent(task))
        .then(function (answer) {
          var data = answer.data;
          if (data.html) { swap(data.html); focusOn(heading()); }
          else message(data.message || data.error || data.unavailable || screen.getAttribute("data-msg-failed"));
        })
        .catch(function (error) {
          if (String(error && error.message) !== "expired") message(screen.getAttribute("data-msg-failed"));
        })
        .finally(function () { if (shown) shown.disabled = false; });
      return;
    }
    send(form);
  });

  schedulePoll();
})();
