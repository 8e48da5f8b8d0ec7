// The per-device memory bars: budget, used, reserved and free, from GetResources.

import type { DeviceResources } from "./gen/modelloader/v1/model_loader_pb.js";
import { bytes } from "./format.js";

function bar(id: string, label: string, value: bigint, max: bigint): HTMLElement[] {
  const l = document.createElement("label");
  l.htmlFor = id;
  l.textContent = label;
  const p = document.createElement("progress");
  p.id = id;
  p.max = Number(max) || 1;
  p.value = Math.min(Number(value), p.max);
  return [l, p];
}

/** Replaces the contents of `into` with one block per device. */
export function renderDevices(into: HTMLElement, devices: DeviceResources[]): void {
  into.replaceChildren(
    ...devices.map((d) => {
      const block = document.createElement("div");
      block.className = "device";
      block.dataset.device = d.name;
      const key = `dev-${d.name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
      const h = document.createElement("h3");
      h.textContent = d.name;
      const booked = d.usedBytes + d.reservedBytes;
      const free = d.budgetBytes > booked ? d.budgetBytes - booked : 0n;
      const summary = document.createElement("p");
      summary.className = "summary";
      summary.textContent =
        `budget ${bytes(d.budgetBytes)} · used ${bytes(d.usedBytes)} · reserved ${bytes(d.reservedBytes)} · ` +
        `free ${bytes(free)} (device ${bytes(d.totalBytes)}, ${bytes(d.availableBytes)} available)`;
      const models = document.createElement("ul");
      models.className = "device-models";
      for (const m of d.models) {
        const li = document.createElement("li");
        li.textContent = `${m.modelId}: ${bytes(m.bytes)}`;
        models.append(li);
      }
      block.append(
        h,
        ...bar(`${key}-used`, `used ${bytes(d.usedBytes)} of the budget`, d.usedBytes, d.budgetBytes),
        ...bar(`${key}-reserved`, `reserved by loads ${bytes(d.reservedBytes)}`, d.reservedBytes, d.budgetBytes),
        summary,
        models,
      );
      return block;
    }),
  );
}
