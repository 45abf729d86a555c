// The Ferry console's only script: systems move between the FIG. 4A groups as their
// group is chosen, and parts marked data-poll refresh themselves every second.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("app-form");
  if (form) {
    form.addEventListener("change", (e) => {
      const select = e.target;
      if (!select.name || !select.name.startsWith("group.")) return;
      const item = select.closest(".system");
      const box = form.querySelector(`fieldset.group[data-group="${select.value}"]`);
      if (item && box) box.appendChild(item);
    });
  }
  for (const part of document.querySelectorAll("[data-poll]")) {
    let busy = false;
    setInterval(async () => {
      // A form being filled in is not replaced under the operator's hands.
      if (busy || part.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;
      busy = true;
      try {
        const r = await fetch(part.dataset.poll, { credentials: "same-origin", cache: "no-store" });
        const hash = r.headers.get("x-part-hash");
        if (r.ok && hash && hash !== part.dataset.hash) {
          part.innerHTML = await r.text();
          part.dataset.hash = hash;
        }
      } catch (_) { /* the next tick tries again */ }
      busy = false;
    }, 1000);
  }
});
