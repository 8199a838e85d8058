// Keeps the parts of a console page marked `data-live` current by fetching the page again every
// 15 seconds and swapping those parts in. Unlike a page refresh, this keeps the reader's place,
// focus and any half-filled form; the button pauses it (WCAG 2.2.1: timing the user can turn off).

const EVERY_MS = 15000;
const toggle = document.getElementById("live-toggle");
let paused = false;

if (toggle && document.querySelector("[data-live]")) {
  toggle.hidden = false;
  toggle.addEventListener("click", () => {
    paused = !paused;
    toggle.setAttribute("aria-pressed", String(paused));
    toggle.textContent = paused ? "Resume live updates" : "Pause live updates";
  });
  setInterval(update, EVERY_MS);
}

async function update() {
  if (paused || document.hidden) return;
  let page;
  try {
    const response = await fetch(location.href, { credentials: "same-origin" });
    // Logged out meanwhile: the next navigation shows the login page.
    if (!response.ok || response.redirected) return;
    page = new DOMParser().parseFromString(await response.text(), "text/html");
  } catch {
    return; // The server is unreachable for now; try again next time.
  }
  for (const part of document.querySelectorAll("[data-live]")) {
    const fresh = page.getElementById(part.id);
    if (fresh) part.replaceWith(document.adoptNode(fresh));
  }
}
