// The job board: start generations, watch them live, cancel them, see results and errors.
import { client } from "/board/api.js";
import { watchJob, TERMINAL } from "/board/use-job-status.js";

const params = new URLSearchParams(location.search);
const API_BASE = params.get("api") ?? ""; // same origin by default
const $ = (id) => document.getElementById(id);

const state = {
  api: null,
  jobs: new Map(), // id -> { status, stop, card }
  completedAt: [], // when jobs completed, for the per-minute rate
};

// ---- sign-in --------------------------------------------------------------------------------

function signIn(token) {
  state.api = client(API_BASE, token);
  sessionStorage.setItem("token", token);
  $("signout").hidden = false;
  $("signin").querySelector("button[type=submit]").hidden = true;
  $("token").value = "";
  $("token").placeholder = "signed in";
  $("start-button").disabled = false;
  for (const id of JSON.parse(sessionStorage.getItem("jobs") ?? "[]")) track(id);
}

$("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (token) signIn(token);
});

$("signout").addEventListener("click", () => {
  sessionStorage.clear();
  location.reload();
});

// ---- starting jobs --------------------------------------------------------------------------

// The board has no catalogue of characters and moodboards: it makes up the entity ids a real
// front end would send.
function requestFor(kind, prompt) {
  const id = () => crypto.randomUUID();
  const body = { prompt: prompt || undefined };
  if (kind === "character") return { ...body, characterId: id() };
  if (kind === "moodboard") return { ...body, moodboardId: id(), count: 4 };
  return { ...body, moodboardId: id(), sourceImageId: id() };
}

$("start").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("start-error").textContent = "";
  if (!state.api) {
    $("start-error").textContent = "Sign in with a token first.";
    return;
  }
  const kind = new FormData(event.target).get("kind");
  try {
    const answer = await state.api.generate(kind, requestFor(kind, $("prompt").value.trim()));
    track(answer.jobId, { id: answer.jobId, status: answer.status, progress: 0, position: answer.position, type: kind });
  } catch (error) {
    $("start-error").textContent = `${error.message} (${error.code})`;
  }
});

// ---- cards ----------------------------------------------------------------------------------

function track(id, initial) {
  if (state.jobs.has(id)) return;
  const card = document.createElement("li");
  card.className = "card";
  card.dataset.jobId = id;
  $("jobs").prepend(card);
  $("no-jobs").hidden = true;
  const job = { status: initial ?? { id, status: "queued", progress: 0 }, card, stop: null };
  state.jobs.set(id, job);
  sessionStorage.setItem("jobs", JSON.stringify([...state.jobs.keys()]));
  render(job);
  job.stop = watchJob(id, {
    fetchStatus: (jobId) => state.api.status(jobId),
    onUpdate: (status) => {
      if (status.status === "completed" && job.status.status !== "completed") state.completedAt.push(Date.now());
      job.status = status;
      render(job);
    },
    onError: (error) => {
      job.card.querySelector(".error").textContent = `${error.message} (${error.code ?? "network"})`;
    },
  });
}

const LABELS = { "character-image": "Character image", character: "Character image", moodboard: "Moodboard", animation: "Animation" };

function render(job) {
  const s = job.status;
  const card = job.card;
  card.innerHTML = "";
  const title = document.createElement("h3");
  title.append(LABELS[s.type] ?? "Job");
  const badge = document.createElement("span");
  badge.className = `badge ${s.status}`;
  badge.textContent = s.status;
  badge.setAttribute("aria-label", `status: ${s.status}`);
  title.append(badge);
  card.append(title);

  const progress = document.createElement("progress");
  progress.max = 100;
  progress.value = s.progress ?? 0;
  progress.setAttribute("aria-label", `progress ${s.progress ?? 0}%`);
  card.append(progress);

  const meta = document.createElement("p");
  meta.className = "meta";
  if (s.status === "queued" && s.position) {
    const wait = s.estimatedWaitSeconds != null ? ` · about ${formatSeconds(s.estimatedWaitSeconds)}` : "";
    meta.textContent = `Position ${s.position} in the queue${wait}`;
  } else if (s.status === "processing") {
    meta.textContent = `Generating… ${s.progress ?? 0}%`;
  } else {
    meta.textContent = s.id;
  }
  card.append(meta);

  if (s.status === "completed" && s.media?.length) {
    const gallery = document.createElement("div");
    gallery.className = "media";
    for (const m of s.media) {
      if (m.mediaType === "video") {
        const video = document.createElement("video");
        Object.assign(video, { src: m.publicUrl, controls: true, loop: true, muted: true, autoplay: true });
        video.setAttribute("aria-label", "generated animation");
        gallery.append(video);
      } else {
        const img = document.createElement("img");
        img.src = m.publicUrl;
        img.alt = `generated ${LABELS[s.type]?.toLowerCase() ?? "image"}`;
        gallery.append(img);
      }
    }
    card.append(gallery);
  }

  const error = document.createElement("p");
  error.className = "error";
  error.setAttribute("role", "status");
  if (s.status === "failed") error.textContent = s.error ?? "failed";
  card.append(error);

  if (!TERMINAL.has(s.status)) {
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.textContent = "Cancel";
    cancel.setAttribute("aria-label", `Cancel job ${s.id}`);
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        job.status = await state.api.cancel(s.id);
        job.stop?.();
        render(job);
      } catch (e) {
        error.textContent = `${e.message} (${e.code})`;
        cancel.disabled = false;
      }
    });
    card.append(cancel);
  }
  renderOverview();
}

function renderOverview() {
  const statuses = [...state.jobs.values()].map((j) => j.status.status);
  $("count-active").textContent = statuses.filter((s) => s === "processing").length;
  $("count-queued").textContent = statuses.filter((s) => s === "queued").length;
  const minuteAgo = Date.now() - 60_000;
  state.completedAt = state.completedAt.filter((t) => t > minuteAgo);
  $("count-rate").textContent = state.completedAt.length;
}

function formatSeconds(s) {
  return s < 90 ? `${s} s` : `${Math.round(s / 60)} min`;
}

setInterval(renderOverview, 5000);
$("start-button").disabled = true;
const saved = sessionStorage.getItem("token");
if (saved) signIn(saved);
