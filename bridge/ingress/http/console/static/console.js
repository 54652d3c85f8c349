/* sms-bridge console: progressive enhancement only; every page works without it.
   Served by the bridge itself (the CSP allows no other script). MIT, as the project. */
(function () {
  "use strict";

  // Ask before a form marked data-confirm (cancel) is sent.
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  // On a phone the message list's filter form filled its first screen: folded there
  // (its summary says what is filtered), open on a wide screen, whichever it turns to.
  var fold = document.querySelector("details.filter-fold");
  if (fold && window.matchMedia) {
    var narrow = window.matchMedia("(max-width: 40rem)");
    var sync = function () {
      fold.open = !narrow.matches;
    };
    sync();
    if (narrow.addEventListener) {
      narrow.addEventListener("change", sync);
    }
  }

  // Refresh the live part of the page in place while it is visible.
  var live = document.getElementById("live");
  if (!live || !window.fetch || !window.DOMParser) {
    return;
  }
  var seconds = Number(live.getAttribute("data-refresh")) || 10;
  var paused = false;
  var toggle = document.createElement("button");
  toggle.type = "button";
  toggle.className = "secondary pause";
  toggle.setAttribute("aria-pressed", "false");
  toggle.textContent = "Pause updates";
  toggle.addEventListener("click", function () {
    paused = !paused;
    toggle.setAttribute("aria-pressed", paused ? "true" : "false");
    toggle.textContent = paused ? "Resume updates" : "Pause updates";
  });
  var controls = document.getElementById("live-controls");
  if (controls) {
    controls.appendChild(toggle);
  } else {
    live.parentNode.insertBefore(toggle, live);
  }

  // Never replace what the keyboard is on: Tab would lose its place. The mouse's focus
  // (a click in a table, a ctrl-click opening a message in a new tab) does not hold the
  // refresh, or the page stopped updating until something outside it was clicked.
  function keyboardIn(element) {
    var focused = document.activeElement;
    if (!focused || focused === document.body || !element.contains(focused)) {
      return false;
    }
    try {
      return focused.matches(":focus-visible");
    } catch (error) {
      return true; // a browser without :focus-visible: any focus holds it, as before
    }
  }

  function refresh() {
    // Nor refresh an unseen tab.
    if (paused || document.hidden || keyboardIn(live)) {
      return;
    }
    // The header says it is no visit: the page shows no action's note to nobody.
    fetch(window.location.href, {
      credentials: "same-origin",
      headers: { Accept: "text/html", "X-Console-Refresh": "1" },
    })
      .then(function (response) {
        return response.ok && !response.redirected ? response.text() : null;
      })
      .then(function (html) {
        if (!html) {
          return;
        }
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("live");
        if (fresh) {
          live.innerHTML = fresh.innerHTML;
          // "As of" stands beside the title, outside the live part: it must say when
          // these figures were read, not when the page was first loaded.
          var stamp = document.querySelector(".updated time");
          var freshStamp = doc.querySelector(".updated time");
          if (stamp && freshStamp) {
            stamp.replaceWith(freshStamp);
          }
        }
      })
      .catch(function () {
        /* the bridge is restarting or gone: try again on the next tick */
      });
  }
  window.setInterval(refresh, seconds * 1000);
})();
