// The dashboard's entry: finds out whether the server wants a key (the API answers 401),
// shows the sign-in form if so, and routes #/ (jobs) and #/jobs/<id> (one job).

import { ApiError, forgetKey, get, saveKey, storedKey } from "./api.js";
import { jobPage } from "./job.js";
import { jobsPage } from "./jobs.js";

const $ = (id) => document.getElementById(id);
let page = null; // the shown view's poller

function showBanner(message) {
  $("banner").textContent = message;
  $("banner").hidden = !message;
}

function stopPage() {
  page?.stop();
  page = null;
  const view = $("view");
  view.replaceChildren();
  for (const name of Object.keys(view.dataset)) delete view.dataset[name];
}

function route() {
  stopPage();
  showBanner("");
  const match = /^#\/jobs\/([^/]+)$/.exec(location.hash);
  page = match ? jobPage($("view"), decodeURIComponent(match[1])) : jobsPage($("view"));
}

function showLogin(message) {
  stopPage();
  document.body.dataset.auth = "login";
  $("login").hidden = false;
  $("signout").hidden = true;
  $("mode").textContent = "";
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
  $("key").focus();
}

function showApp(keyed) {
  document.body.dataset.auth = keyed ? "key" : "open";
  $("login").hidden = true;
  $("signout").hidden = !keyed;
  $("mode").textContent = keyed ? "signed in with an API key" : "keys off (dev mode)";
  route();
}

// Does the API answer with the key this tab holds (or, with none, is auth off)?
async function probe(key) {
  try {
    await get("/fine_tuning/jobs", { limit: 1 }, key);
    return null;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return err;
    throw err;
  }
}

async function signIn(ev) {
  ev.preventDefault();
  const key = $("key").value.trim();
  const refused = await probe(key).catch((err) => err);
  if (refused) {
    $("login-error").textContent = `That key was refused: ${refused.message}`;
    $("login-error").hidden = false;
    return;
  }
  saveKey(key);
  $("key").value = "";
  showApp(true);
}

async function start() {
  $("login-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => {
    forgetKey();
    history.replaceState(null, "", "#/"); // the next key starts at its jobs
    showLogin("");
  });
  window.addEventListener("hashchange", () => document.body.dataset.auth !== "login" && route());
  window.addEventListener("posttrain-unauthorized", (ev) => {
    forgetKey();
    showLogin(`Your key was refused: ${ev.detail.message}`);
  });
  window.addEventListener("posttrain-error", (ev) => showBanner(ev.detail.message || String(ev.detail)));
  const key = storedKey();
  try {
    const refused = await probe(key);
    if (!refused) return showApp(Boolean(key));
    if (key) forgetKey();
    showLogin(key ? `Your saved key was refused: ${refused.message}` : "");
  } catch (err) {
    showBanner(`The API did not answer: ${err.message}`);
  }
}

start();
