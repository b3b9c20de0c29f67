// Tanjiren console: keeps each step's live output to its last MAX_LINES lines
// (the raw log download has them all) and scrolled to its end while new lines
// arrive, unless the reader has scrolled up. Everything else is htmx.
(function () {
  "use strict";
  var MAX_LINES = 5000;
  function follow(pre) {
    var atEnd = true;
    var note = null;
    pre.addEventListener("scroll", function () {
      atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
    });
    new MutationObserver(function () {
      var lines = pre.querySelectorAll(":scope > span.ln-out, :scope > span.ln-err");
      var extra = lines.length - MAX_LINES;
      for (var i = 0; i < extra; i++) lines[i].remove();
      if (extra > 0 && !note) {
        note = document.createElement("span");
        note.className = "ln-note";
        note.textContent = "[earlier lines are in the raw log]\n";
        pre.prepend(note);
      }
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }).observe(pre, { childList: true });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("pre.output").forEach(follow);
  });
})();
