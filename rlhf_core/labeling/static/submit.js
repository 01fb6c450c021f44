// Saving a label and moving on, shared by the rating and demonstration pages (loaded before their own script).
(function () {
  "use strict";

  // POST one label; on success (or 409: already saved by a retried request; 404: the item went to another
  // annotator) go on to the next item. Returns false, after telling the annotator why, when nothing was saved.
  window.submitLabel = async function (assignmentId, action, body, say) {
    say("Saving…");
    try {
      const response = await fetch("/api/assignments/" + assignmentId + "/" + action, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        credentials: "same-origin",
      });
      if (response.ok || response.status === 409 || response.status === 404) {
        window.location.assign("/label");
        return true;
      }
      if (response.status === 401) {
        window.location.assign("/signin");
        return true;
      }
      if (response.status === 413) {
        say("Not saved (413): the text is too long to send.");
        return false;
      }
      const detail = await response.json().catch(() => ({}));
      say("Not saved (" + response.status + "): " + JSON.stringify(detail.detail || ""));
    } catch (error) {
      say("Not saved: the server cannot be reached. Try again.");
    }
    return false;
  };
})();
