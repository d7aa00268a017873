(function () {
  "use strict";
  if (window.B24Frame) window.B24Frame.autoFit();
})();
