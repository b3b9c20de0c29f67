// Tanjiren console: keeps each step's output scrolled to its end while new lines
// arrive (unless the reader has scrolled up). Everything else is htmx.
(function () {
  "use strict";
  function follow(pre) {
    var atEnd = true;
    pre.addEventListener("scroll", function () {
      atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
    });
    new MutationObserver(function () {
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }).observe(pre, { childList: true });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("pre.output").forEach(follow);
  });
})();
