// The dashboard: every model the server knows, live from WatchModels, with Load, Cancel and
// Unload, and the memory of each device. Only the public gRPC API, over gRPC-web.

import { type Api, Code, code, connect, describe, setToken, token } from "./api.js";
import { ModelState, type ModelStatus } from "./gen/modelloader/v1/model_loader_pb.js";
import { duration } from "./format.js";
import { renderDevices } from "./memory.js";
import { type Actions, ModelCard, stateName } from "./model.js";

const api: Api = connect();
const cards = new Map<string, ModelCard>();

function byId<T extends HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`the page has no #${id}`);
  return e as T;
}

const connection = byId<HTMLParagraphElement>("connection");
const action = byId<HTMLParagraphElement>("action");
const list = byId<HTMLUListElement>("models");

function say(text: string): void {
  action.textContent = text;
}

const actions: Actions = {
  load: (id) => void load(id),
  cancel: (id) => void run(`Cancel ${id}`, async () => {
    const r = await api.cancelLoad({ modelId: id });
    say(r.wasLoading ? `Cancelled the load of ${id}.` : `${id} was not loading.`);
  }),
  unload: (id, attached) => {
    // Unloading under attached clients closes their connections: ask first, then force.
    const force = attached > 0;
    if (force && !confirm(`${id} has ${attached} attached client(s). Unload it anyway? Their connections are closed.`)) return;
    void run(`Unload ${id}`, async () => {
      await api.unloadModel({ modelId: id, force });
      say(`Unloaded ${id}.`);
    });
  },
};

async function run(what: string, call: () => Promise<void>): Promise<void> {
  try {
    await call();
  } catch (err) {
    if (code(err) === Code.Unauthenticated) askForToken();
    say(`${what} failed: ${describe(err)}`);
  }
}

/**
 * Starts a load and lets it go once the server has taken it: its progress arrives through the
 * watch like any other load's, and a plain-HTTP page has few connections per origin to hold open.
 * The load does not depend on this call.
 */
async function load(id: string, device = "", dtype = ""): Promise<void> {
  const stop = new AbortController();
  say(`Loading ${id}…`);
  try {
    const stream = api.loadModel(
      { modelId: id, device: device || undefined, dtype: dtype || undefined },
      { signal: stop.signal },
    );
    // Its messages are not shown: the watch brings the same ones, in order with the statuses.
    for await (const p of stream) {
      say(p.step >= p.total ? `${id} is loaded.` : `The server took the load of ${id}.`);
      stop.abort();
      break;
    }
  } catch (err) {
    if (stop.signal.aborted) return; // our own letting go, not a failure
    if (code(err) === Code.Unauthenticated) askForToken();
    say(`Load ${id} failed: ${describe(err)}`);
  }
}

function upsert(status: ModelStatus): void {
  const card = cards.get(status.modelId);
  if (card) {
    card.setStatus(status);
    return;
  }
  const fresh = new ModelCard(status, actions);
  cards.set(status.modelId, fresh);
  // Keep the list sorted by id, as ListModels is.
  const after = [...cards.keys()].sort().find((k) => k > status.modelId);
  list.insertBefore(fresh.root, after ? (cards.get(after)?.root ?? null) : null);
  byId("models-empty").hidden = true;
  const option = document.createElement("option");
  option.value = status.modelId;
  byId("known-models").append(option);
}

// GetResources after events, at most every 150 ms: a load sends many progress messages.
let resourcesTimer: number | undefined;
function refreshResources(): void {
  if (resourcesTimer !== undefined) return;
  resourcesTimer = window.setTimeout(async () => {
    resourcesTimer = undefined;
    try {
      const r = await api.getResources({});
      renderDevices(byId("devices"), r.devices);
    } catch {
      // The watch reports a lost connection; the next event asks again.
    }
  }, 150);
}

async function listAll(): Promise<ModelStatus[]> {
  const all: ModelStatus[] = [];
  let pageToken = "";
  do {
    const page = await api.listModels({ pageSize: 1000, pageToken });
    all.push(...page.models);
    pageToken = page.nextPageToken;
  } while (pageToken !== "");
  return all;
}

/** One connected session: the list, then the watch's snapshot and events until it ends. */
async function follow(onLive: () => void): Promise<void> {
  // The list first, then the watch: its snapshot is newer than the list for every tracked model.
  const models = await listAll();
  onLive();
  // After a restart the server may know other models: forget the ones it no longer lists.
  const listed = new Set(models.map((m) => m.modelId));
  for (const [id, card] of cards) {
    if (!listed.has(id)) {
      card.root.remove();
      cards.delete(id);
    }
  }
  for (const m of models) upsert(m);
  // Navigation to the first rendered list: the reload time the browser tests measure.
  if (performance.getEntriesByName("models-rendered").length === 0) performance.mark("models-rendered");
  refreshResources();
  for await (const event of api.watchModels({ modelId: "" })) {
    if (event.event.case === "status") upsert(event.event.value);
    else if (event.event.case === "progress") cards.get(event.event.value.modelId)?.setProgress(event.event.value);
    refreshResources();
  }
}

/**
 * Attaching and detaching are no WatchModels event (its statuses count attached clients, but a
 * new client sends none), so the list is asked again every few seconds for the attached clients
 * and last use. A listed status replaces the card's only when its state is the one
 * the card shows (and not a load in flight): the watch stays the word on every change.
 */
async function refreshAttached(): Promise<void> {
  try {
    for (const m of await listAll()) {
      const c = cards.get(m.modelId);
      const changed = c && (c.status.attachedClients !== m.attachedClients || c.status.lastUsedUnixMs !== m.lastUsedUnixMs);
      if (c && changed && c.status.state === m.state && m.state !== ModelState.LOADING) {
        c.setStatus(m);
      }
    }
  } catch {
    // The watch reports a lost connection.
  }
}

/** Follows the server for ever, reconnecting with backoff (0.5 s doubling to 10 s). */
async function stayConnected(): Promise<void> {
  let attempt = 0;
  let everConnected = false;
  for (;;) {
    const onLive = () => {
      attempt = 0;
      connection.textContent = everConnected ? "Live again: reconnected to the server." : "Live.";
      everConnected = true;
      connection.dataset.state = "live";
    };
    try {
      await follow(onLive);
      throw new Error("the server ended the watch");
    } catch (err) {
      if (code(err) === Code.Unauthenticated) {
        askForToken();
        connection.dataset.state = "auth";
        connection.textContent = "The server wants a token.";
        await tokenGiven();
        continue;
      }
      attempt += 1;
      const wait = Math.min(10, 0.5 * 2 ** (attempt - 1));
      connection.dataset.state = "reconnecting";
      connection.textContent = `${everConnected ? "Connection to the server lost" : "Cannot reach the server"} (${describe(err)}). Reconnecting in ${duration(wait)} (attempt ${attempt})…`;
      await new Promise((r) => setTimeout(r, wait * 1000));
    }
  }
}

let tokenWaiters: (() => void)[] = [];
function tokenGiven(): Promise<void> {
  return new Promise((r) => tokenWaiters.push(r));
}

function askForToken(): void {
  const form = byId<HTMLFormElement>("token-form");
  if (!form.hidden) return;
  setToken(null);
  form.hidden = false;
  byId<HTMLInputElement>("token").focus();
}

function wireForms(): void {
  const tokenForm = byId<HTMLFormElement>("token-form");
  tokenForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const input = byId<HTMLInputElement>("token");
    setToken(input.value.trim());
    input.value = "";
    tokenForm.hidden = true;
    const waiters = tokenWaiters;
    tokenWaiters = [];
    for (const w of waiters) w();
  });
  byId<HTMLFormElement>("load-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = byId<HTMLInputElement>("load-model").value.trim();
    if (id === "") return;
    void load(id, byId<HTMLInputElement>("load-device").value.trim(), byId<HTMLSelectElement>("load-dtype").value);
  });
}

wireForms();
if (token() === null) byId<HTMLFormElement>("token-form").hidden = true;
void stayConnected();
setInterval(() => {
  if (connection.dataset.state === "live" && document.visibilityState === "visible") void refreshAttached();
}, 5000);
// For the browser tests and people's consoles: the state of every model as the page shows it.
(window as unknown as { modelStates: () => Record<string, string> }).modelStates = () =>
  Object.fromEntries([...cards].map(([id, c]) => [id, stateName(c.status.state)]));
