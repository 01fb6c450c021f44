// Demonstration page: write (or edit the draft into) the ideal answer, with a live word count against the length
// guide; submit or skip. The draft is read from the page's escaped text, and only ever written into a textarea value.
(function () {
  "use strict";

  const item = document.getElementById("item");
  if (!item || item.dataset.task !== "demonstration") return;

  const assignmentId = item.dataset.assignment;
  const answer = document.getElementById("answer");
  const count = document.getElementById("word-count");
  const status = document.getElementById("status");
  const submitButton = document.getElementById("submit");
  const draft = document.getElementById("draft-text");
  const minWords = Number(item.dataset.minWords);
  const maxWords = Number(item.dataset.maxWords);
  let busy = false;

  const say = (text) => { status.textContent = text; };
  const words = () => answer.value.split(/\s+/).filter(Boolean).length;

  function render() {
    const n = words();
    let verdict = "within the guide";
    if (n < minWords) verdict = (minWords - n) + " below the guide";
    else if (n > maxWords) verdict = (n - maxWords) + " above the guide";
    count.textContent = n + (n === 1 ? " word" : " words") + " (guide " + minWords + "–" + maxWords + "): " + verdict;
    count.classList.toggle("outside", n < minWords || n > maxWords);
    submitButton.disabled = n === 0;
  }

  async function send(action, body) {
    if (busy) return;
    busy = true;
    if (!(await window.submitLabel(assignmentId, action, body, say))) busy = false;
  }

  function submit() {
    if (!answer.value.trim()) {
      say("Write an answer first, or skip the item.");
      return;
    }
    send("demonstration", { text: answer.value });
  }

  answer.addEventListener("input", render);
  submitButton.addEventListener("click", submit);
  document.getElementById("skip").addEventListener("click", () => send("skip", {}));
  document.getElementById("clear").addEventListener("click", () => {
    answer.value = "";
    answer.focus();
    render();
  });
  const restore = document.getElementById("restore");
  if (restore && draft) {
    restore.addEventListener("click", () => {
      answer.value = draft.textContent;
      answer.focus();
      render();
    });
  }
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      submit();
    }
  });

  render();
})();
