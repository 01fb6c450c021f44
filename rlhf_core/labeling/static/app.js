// Labelling page: rank the completions best to worst by click, keyboard or drag, flag them, submit or skip.
// Completion texts are never touched here: the server renders them escaped; this file only reads ids and numbers.
(function () {
  "use strict";

  const item = document.getElementById("item");
  if (!item) return;

  const assignmentId = item.dataset.assignment;
  const cards = Array.from(item.querySelectorAll(".completion"));
  const cardById = new Map(cards.map((card) => [card.dataset.id, card]));
  const cardByKey = new Map(cards.map((card) => [card.dataset.key, card]));
  const rankingList = document.getElementById("ranking");
  const remaining = document.getElementById("remaining");
  const status = document.getElementById("status");
  const submitButton = document.getElementById("submit");

  let groups = []; // best first; each group holds the ids of tied completions
  const flags = {}; // completion id -> "unsafe" | "nonsense"
  let busy = false;

  const ranked = () => groups.flat();
  const unranked = () => cards.map((card) => card.dataset.id).filter((id) => !ranked().includes(id));
  const number = (id) => "#" + cardById.get(id).dataset.key;

  // Competition ranks, as stored: [[a], [b, c], [d]] -> 1, 2, 2, 4.
  function rankOf(id) {
    let rank = 1;
    for (const group of groups) {
      if (group.includes(id)) return { rank: rank, tied: group.length > 1 };
      rank += group.length;
    }
    return null;
  }

  function pick(id) {
    if (ranked().includes(id)) return;
    groups.push([id]);
    render();
  }

  function unpick(id) {
    groups = groups.map((group) => group.filter((other) => other !== id)).filter((group) => group.length);
    render();
  }

  function tieWithPrevious() {
    if (groups.length < 2) {
      say("Pick two completions first: the tie joins the last pick to the one before.");
      return;
    }
    const last = groups.pop();
    groups[groups.length - 1].push(...last);
    render();
  }

  function undo() {
    const last = groups[groups.length - 1];
    if (!last) return;
    last.pop();
    if (!last.length) groups.pop();
    render();
  }

  function reset() {
    groups = [];
    render();
  }

  function toggleFlag(id, flag) {
    if (flags[id] === flag) delete flags[id];
    else flags[id] = flag;
    render();
  }

  function move(from, to) {
    const [group] = groups.splice(from, 1);
    groups.splice(to, 0, group);
    render();
  }

  function render() {
    rankingList.replaceChildren(...groups.map(rankingEntry));
    for (const card of cards) {
      const place = rankOf(card.dataset.id);
      card.classList.toggle("ranked", place !== null);
      card.querySelector(".rank").textContent = place ? "Rank " + place.rank + (place.tied ? " (tie)" : "") : "";
      card.classList.toggle("flagged", card.dataset.id in flags);
      for (const button of card.querySelectorAll(".flag")) {
        button.setAttribute("aria-pressed", String(flags[card.dataset.id] === button.dataset.flag));
      }
    }
    const rest = unranked();
    remaining.textContent = rest.length
      ? "Still to rank: " + rest.map(number).join(", ") + (rest.length === 1 ? " (goes last on submit)" : "")
      : "All ranked. Press Enter to submit.";
    submitButton.disabled = rest.length > 1;
  }

  function rankingEntry(group, index) {
    const entry = document.createElement("li");
    const place = rankOf(group[0]);
    entry.textContent = place.rank + ". " + group.map(number).join(" = ") + (group.length > 1 ? "  (tie)" : "");
    entry.draggable = true;
    entry.dataset.index = String(index);
    entry.title = "Drag to reorder";
    return entry;
  }

  function say(text) {
    status.textContent = text;
  }

  function submit() {
    if (busy) return;
    const rest = unranked();
    if (rest.length > 1) {
      say("Rank every completion first, or skip the item.");
      return;
    }
    if (rest.length === 1) {
      groups.push(rest);
      render();
    }
    send("label", { ranking: groups, flags: flags });
  }

  function skip() {
    if (!busy) send("skip", { flags: flags });
  }

  async function send(action, body) {
    busy = true;
    say("Saving…");
    try {
      const response = await fetch("/api/assignments/" + assignmentId + "/" + action, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        credentials: "same-origin",
      });
      // 409: already saved (a retried request); 404: the item went to another annotator. Either way, on to the next.
      if (response.ok || response.status === 409 || response.status === 404) {
        window.location.assign("/label");
        return;
      }
      if (response.status === 401) {
        window.location.assign("/signin");
        return;
      }
      const detail = await response.json().catch(() => ({}));
      say("Not saved (" + response.status + "): " + JSON.stringify(detail.detail || ""));
    } catch (error) {
      say("Not saved: the server cannot be reached. Try again.");
    }
    busy = false;
  }

  // A button clicked with the mouse keeps the focus; drop it so that Enter submits instead of clicking it again.
  function onClick(element, action) {
    element.addEventListener("click", (event) => {
      if (event.detail) element.blur();
      action(event);
    });
  }

  for (const card of cards) {
    onClick(card, (event) => {
      const flagButton = event.target.closest(".flag");
      if (flagButton) toggleFlag(card.dataset.id, flagButton.dataset.flag);
      else if (ranked().includes(card.dataset.id)) unpick(card.dataset.id);
      else pick(card.dataset.id);
    });
  }
  onClick(document.getElementById("tie"), tieWithPrevious);
  onClick(document.getElementById("undo"), undo);
  onClick(document.getElementById("reset"), reset);
  onClick(submitButton, submit);
  onClick(document.getElementById("skip"), skip);

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const card = cardByKey.get(event.key);
    if (card) pick(card.dataset.id);
    else if (event.key === "t") tieWithPrevious();
    else if (event.key === "Backspace") undo();
    else if (event.key === "s") skip();
    else if (event.key === "Enter" && !event.target.closest("button")) submit();
    else return;
    event.preventDefault();
  });

  rankingList.addEventListener("dragstart", (event) => {
    event.dataTransfer.setData("text/plain", event.target.dataset.index);
    event.dataTransfer.effectAllowed = "move";
  });
  rankingList.addEventListener("dragover", (event) => event.preventDefault());
  rankingList.addEventListener("drop", (event) => {
    event.preventDefault();
    const target = event.target.closest("li");
    const from = Number(event.dataTransfer.getData("text/plain"));
    const to = target ? Number(target.dataset.index) : groups.length - 1;
    if (Number.isInteger(from) && from !== to) move(from, to);
  });

  render();
})();
