/*
 * The child side of the Bitrix24 frame protocol, without loading BX24.js from the internet.
 *
 * The portal names our iframe "DOMAIN|PROTOCOL|APP_SID" and talks to us with postMessage:
 * we send "command:JSON-params:callbackKey:APP_SID" to the portal origin and it answers
 * "callbackKey:JSON". Only messages from that origin are read.
 *
 * DOMAIN may carry a default port ("example.bitrix24.com:443"). b24jssdk drops ":80" and ":443"
 * before it builds the origin (packages/jssdk/src/frame/frame.ts, AppFrame), and so do we: a
 * browser never names a default port in `event.origin`, so with the port kept no answer of the
 * portal would ever match the origin we compare it with, and every call would time out.
 */
(function () {
  "use strict";
  var parts = (window.name || "").split("|");
  var available = window.parent !== window && parts.length >= 3 && /^[A-Za-z0-9.:\-\[\]]+$/.test(parts[0]);
  var domain = available ? parts[0].replace(/:(80|443)$/, "") : null;
  var origin = available ? (parts[1] === "1" ? "https://" : "http://") + domain : null;
  var appSid = available ? parts[2] : null;
  var pending = {};
  var sequence = 0;

  window.addEventListener("message", function (event) {
    if (!available || event.origin !== origin || typeof event.data !== "string") return;
    var colon = event.data.indexOf(":");
    var key = colon < 0 ? event.data : event.data.slice(0, colon);
    var callback = pending[key];
    if (!callback) return;
    delete pending[key];
    var payload = colon < 0 ? "" : event.data.slice(colon + 1);
    var value = null;
    try { value = payload ? JSON.parse(payload) : null; } catch (e) { value = payload; }
    callback(value);
  });

  function send(command, params, timeoutMs) {
    return new Promise(function (resolve, reject) {
      if (!available) { reject(new Error("Not inside a Bitrix24 frame")); return; }
      sequence += 1;
      var key = "b24r" + sequence + "_" + Math.random().toString(36).slice(2, 10);
      pending[key] = resolve;
      var body = params ? JSON.stringify(params) : "";
      window.parent.postMessage([command, body, key, appSid].join(":"), origin);
      setTimeout(function () {
        if (pending[key]) { delete pending[key]; reject(new Error("No answer to " + command)); }
      }, timeoutMs || 10000);
    });
  }

  function contentHeight() {
    return Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0);
  }

  window.B24Frame = {
    available: available,
    /* The portal's origin our messages go to and answers must come from (null outside a frame). */
    origin: origin,
    send: send,
    fitWindow: function () { return send("resizeWindow", { width: "100%", height: contentHeight() }); },
    refreshAuth: function () { return send("refreshAuth"); },
    /*
     * Whether the portal opened us to install the app: getInitData's INSTALL, which b24jssdk keeps
     * as isInstallMode (packages/jssdk/src/frame/b24.ts). Rejects when the portal does not answer
     * or answers with something that is not init data.
     */
    installMode: function () {
      return send("getInitData").then(function (data) {
        if (!data || typeof data !== "object") throw new Error("Bitrix24 sent no init data");
        return !!data.INSTALL;
      });
    },
    /* Call only in install mode: b24jssdk refuses to otherwise, and BX24.installFinish does nothing. */
    installFinish: function () { return send("setInstallFinish"); },
    /* Keep the frame as tall as the page: on load and whenever the content changes size. */
    autoFit: function () {
      if (!available) return;
      var last = 0;
      var fit = function () {
        var height = contentHeight();
        if (height !== last) { last = height; send("resizeWindow", { width: "100%", height: height }).catch(function () {}); }
      };
      fit();
      if (window.ResizeObserver) new ResizeObserver(fit).observe(document.body);
    }
  };
})();
