/* Rendered only after the server verified the install and bound the tab and events. */
(function () {
  "use strict";
  var status = document.querySelector("[data-install-status]");
  if (!window.B24Frame || !window.B24Frame.available) {
    if (status) status.textContent = "Open this page from Bitrix24 to finish the installation.";
    return;
  }
  window.B24Frame.installFinish().catch(function () {
    if (status) status.textContent = "Bitrix24 did not answer; reload the page to finish the installation.";
  });
})();
