// Rating page: a 1-7 score per completion (radio buttons or, on a focused card, the number keys), optional
// comments and flags; submit when every completion has a score, or skip. Texts are rendered escaped by the server.
(function () {
  "use strict";

  const item = document.getElementById("item");
  if (!item || item.dataset.task !== "rating") return;

  const assignmentId = item.dataset.assignment;
  const cards = Array.from(item.querySelectorAll(".completion"));
  const remaining = document.getElementById("remaining");
  const status = document.getElementById("status");
  const submitButton = document.getElementById("submit");
  const flags = {}; // completion id -> "unsafe" | "nonsense"
  let busy = false;

  const say = (text) => { status.textContent = text; };
  const chosen = (card) => card.querySelector("input[type=radio]:checked");

  function render() {
    const missing = cards.filter((card) => !chosen(card)).map((card) => "#" + card.dataset.key);
    remaining.textContent = missing.length ? "Still to score: " + missing.join(", ") : "All scored. Ctrl+Enter submits.";
    submitButton.disabled = missing.length > 0;
    for (const card of cards) {
      card.classList.toggle("ranked", Boolean(chosen(card)));
      card.classList.toggle("flagged", card.dataset.id in flags);
      for (const button of card.querySelectorAll(".flag")) {
        button.setAttribute("aria-pressed", String(flags[card.dataset.id] === button.dataset.flag));
      }
    }
  }

  async function send(action, body) {
    if (busy) return;
    busy = true;
    if (!(await window.submitLabel(assignmentId, action, body, say))) busy = false;
  }

  function submit() {
    if (cards.some((card) => !chosen(card))) {
      say("Score every completion first, or skip the item.");
      return;
    }
    const scores = {};
    const comments = {};
    for (const card of cards) {
      scores[card.dataset.id] = Number(chosen(card).value);
      const comment = card.querySelector("textarea").value;
      if (comment.trim()) comments[card.dataset.id] = comment;
    }
    send("rating", { scores: scores, comments: comments, flags: flags });
  }

  for (const card of cards) {
    for (const input of card.querySelectorAll("input[type=radio]")) input.addEventListener("change", render);
    for (const button of card.querySelectorAll(".flag")) {
      button.addEventListener("click", () => {
        const id = card.dataset.id;
        if (flags[id] === button.dataset.flag) delete flags[id];
        else flags[id] = button.dataset.flag;
        render();
      });
    }
  }
  submitButton.addEventListener("click", submit);
  document.getElementById("skip").addEventListener("click", () => send("skip", { flags: flags }));

  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      submit();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat || event.target.closest("textarea")) return;
    if (event.key === "s") {
      event.preventDefault();
      send("skip", { flags: flags });
    }
  });

  render();
})();
