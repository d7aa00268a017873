/*
 * Rendered only after the server verified the install and bound the tab and events.
 *
 * Finishes the install only when the portal opened the page to install the app (getInitData's
 * INSTALL), as b24jssdk does (installFinish rejects with "Application was previously installed"
 * otherwise): an admin may open the installer again long after, and then there is nothing to
 * finish. Every text it shows comes from the template, in the frame's language.
 */
(function () {
  "use strict";
  var status = document.querySelector("[data-install-status]");

  function say(name) {
    if (status) status.textContent = status.getAttribute("data-msg-" + name);
  }

  if (!window.B24Frame || !window.B24Frame.available) {
    say("outside");
    return;
  }
  window.B24Frame.installMode().then(function (installing) {
    if (!installing) {
      say("installed");
      return null;
    }
    return window.B24Frame.installFinish().then(function () { say("finished"); });
  }).catch(function () {
    say("no-answer");
  });
})();
