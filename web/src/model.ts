// One model's card in the list: built once, then updated in place on every event, so a button
// that has the keyboard's focus keeps it while the numbers change.

import { ModelLoadPhase, type ModelLoadProgress, ModelSource, ModelState, type ModelStatus } from "./gen/modelloader/v1/model_loader_pb.js";
import { byteProgress, bytes, Rate, when } from "./format.js";

/** What a card's buttons ask for; the page makes the calls. */
export interface Actions {
  load(modelId: string): void;
  cancel(modelId: string): void;
  unload(modelId: string, attached: number): void;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, className?: string, text?: string): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

export function stateName(s: ModelState): string {
  return ModelState[s] ?? "UNSPECIFIED";
}

function sourceName(s: ModelSource): string {
  return s === ModelSource.UNSPECIFIED ? "" : (ModelSource[s] ?? "").toLowerCase().replace("_", " ");
}

export class ModelCard {
  readonly root = el("li", "model");
  private readonly state = el("span", "state");
  private readonly facts = el("dl", "facts");
  private readonly progress = el("div", "progress");
  private readonly stepLabel = el("label", "step-label");
  private readonly stepBar = el("progress", "step-bar");
  private readonly byteLabel = el("label", "byte-label");
  private readonly byteBar = el("progress", "byte-bar");
  private readonly detail = el("p", "detail");
  private readonly error = el("p", "error");
  private readonly note = el("p", "note");
  private readonly outcome = el("p", "outcome");
  /** What became of the last load this page saw end without loading ("" when none). */
  private stopped = "";
  private readonly loadButton = el("button", "load", "Load");
  private readonly cancelButton = el("button", "cancel", "Cancel");
  private readonly unloadButton = el("button", "unload", "Unload");
  private readonly rate = new Rate();
  status: ModelStatus;

  constructor(status: ModelStatus, actions: Actions) {
    this.status = status;
    const id = status.modelId;
    // Ids are made of letters, digits and -_./: safe as a DOM id once the slashes and dots go.
    const key = `m-${id.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    this.root.dataset.modelId = id;
    const heading = el("h3", undefined, id);
    heading.id = `${key}-name`;
    this.root.setAttribute("aria-labelledby", heading.id);
    heading.append(" ", this.state);
    this.stepBar.id = `${key}-step`;
    this.stepLabel.htmlFor = this.stepBar.id;
    this.byteBar.id = `${key}-bytes`;
    this.byteLabel.htmlFor = this.byteBar.id;
    this.progress.append(this.stepLabel, this.stepBar, this.byteLabel, this.byteBar, this.detail);
    for (const [button, verb] of [[this.loadButton, "Load"], [this.cancelButton, "Cancel loading"], [this.unloadButton, "Unload"]] as const) {
      button.type = "button";
      button.setAttribute("aria-label", `${verb} ${id}`);
    }
    this.loadButton.addEventListener("click", () => actions.load(id));
    this.cancelButton.addEventListener("click", () => actions.cancel(id));
    this.unloadButton.addEventListener("click", () => actions.unload(id, this.status.attachedClients));
    const buttons = el("p", "buttons");
    buttons.append(this.loadButton, " ", this.cancelButton, " ", this.unloadButton);
    this.error.setAttribute("role", "alert");
    this.outcome.setAttribute("role", "status");
    this.root.append(heading, this.facts, this.progress, this.error, this.outcome, this.note, buttons);
    this.render();
  }

  /** A new status (from a snapshot or a change). */
  setStatus(status: ModelStatus): void {
    const was = this.status.state;
    if (status.state === ModelState.LOADING) this.stopped = "";
    else if (was === ModelState.LOADING && status.state === ModelState.UNLOADED) {
      // A load that ends UNLOADED was cancelled (CancelLoad, an unload, or shutdown).
      const p = this.status.lastProgress;
      this.stopped = `CANCELLED: the load stopped${p ? ` at step ${p.step}/${p.total || 8}` : ""}.`;
    }
    this.status = status;
    this.render();
  }

  /** A progress message of the model's load in flight. */
  setProgress(progress: ModelLoadProgress): void {
    this.status.lastProgress = progress;
    if (this.status.state !== ModelState.LOADING && progress.step < progress.total) {
      this.stopped = "";
      // A progress message means a load is under way, even before its status change arrives.
      this.status.state = ModelState.LOADING;
    }
    this.render();
  }

  private render(): void {
    const s = this.status;
    const name = stateName(s.state);
    this.root.dataset.state = name;
    this.state.textContent = name;
    this.renderFacts(s);
    this.renderProgress(s);
    const kind = s.errorKind;
    this.error.hidden = s.state !== ModelState.FAILED || s.error === "";
    this.error.textContent = `Last error${kind ? ` (${kind})` : ""}: ${s.error}`;
    this.note.hidden = s.unloadReason === "";
    this.note.textContent = `Unloaded by the server: ${s.unloadReason}`;
    this.outcome.hidden = this.stopped === "" || s.state !== ModelState.UNLOADED;
    this.outcome.textContent = this.stopped;
    const loading = s.state === ModelState.LOADING;
    this.loadButton.hidden = loading || s.state === ModelState.LOADED || s.state === ModelState.UNLOADING;
    this.cancelButton.hidden = !loading;
    this.unloadButton.hidden = s.state !== ModelState.LOADED;
    this.unloadButton.textContent = s.attachedClients > 0 ? "Force unload" : "Unload";
  }

  private renderFacts(s: ModelStatus): void {
    const facts: [string, string][] = [];
    if (s.device) facts.push(["device", s.device]);
    if (s.dtype) facts.push(["dtype", s.dtype]);
    if (s.weightBytes > 0n) facts.push(["size", bytes(s.weightBytes)]);
    const source = sourceName(s.source);
    if (source) facts.push(["source", source]);
    if (s.revision) facts.push(["revision", s.revision.slice(0, 12)]);
    facts.push(["attached clients", String(s.attachedClients)]);
    if (s.lastUsedUnixMs > 0n) facts.push(["last used", when(s.lastUsedUnixMs)]);
    this.facts.replaceChildren(
      ...facts.flatMap(([k, v]) => {
        const div = el("div");
        div.append(el("dt", undefined, k), el("dd", undefined, v));
        return [div];
      }),
    );
  }

  private renderProgress(s: ModelStatus): void {
    const p = s.lastProgress;
    // A loaded model keeps its last step (8/8); an unloaded one shows none.
    const show = p !== undefined && s.state !== ModelState.UNLOADED && s.state !== ModelState.UNLOADING;
    this.progress.hidden = !show;
    if (!show || !p) return;
    const total = p.total || 8;
    const phase = p.phase === ModelLoadPhase.UNSPECIFIED ? "" : ` (${(ModelLoadPhase[p.phase] ?? "").toLowerCase()} phase)`;
    this.stepLabel.textContent = `step ${p.step}/${total} ${p.message}${phase}`;
    this.stepBar.max = total;
    this.stepBar.value = p.step;
    const moving = p.bytesTotal > 0n && s.state === ModelState.LOADING;
    this.byteLabel.hidden = !moving;
    this.byteBar.hidden = !moving;
    if (moving) {
      const perSecond = this.rate.sample(p.step, Number(p.bytesDone), performance.now());
      this.byteLabel.textContent = byteProgress(p.bytesDone, p.bytesTotal, perSecond);
      // <progress> takes doubles: exact below 2^53 bytes, far more than any model.
      this.byteBar.max = Number(p.bytesTotal);
      this.byteBar.value = Number(p.bytesDone);
    }
    this.detail.textContent = p.detail;
    this.detail.hidden = p.detail === "";
  }
}
