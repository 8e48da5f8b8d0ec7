// Numbers as people read them: bytes in binary units, rates, durations; and the rate and ETA of
// a load's byte progress.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/** `1536` → `1.5 KiB`. */
export function bytes(n: bigint | number): string {
  let v = Number(n);
  let unit = 0;
  while (v >= 1024 && unit < UNITS.length - 1) {
    v /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${UNITS[unit]}`;
}

/** Seconds as `42 s`, `3 min 5 s`, `1 h 2 min`. */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.ceil(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** Milliseconds since the Unix epoch as a local time, or "never" for 0. */
export function when(unixMs: bigint | number): string {
  const ms = Number(unixMs);
  return ms === 0 ? "never" : new Date(ms).toLocaleString();
}

/**
 * The byte rate of one step of one load, smoothed (an exponential moving average over the
 * samples), so the ETA does not jump with every message. A new step or fewer bytes start over.
 */
export class Rate {
  private step = 0;
  private lastBytes = 0;
  private lastTime = 0;
  private perSecond = 0;

  /** Records `done` bytes of `step` at time `now` (ms); returns bytes per second, 0 until known. */
  sample(step: number, done: number, now: number): number {
    if (step !== this.step || done < this.lastBytes) {
      this.step = step;
      this.lastBytes = done;
      this.lastTime = now;
      this.perSecond = 0;
      return 0;
    }
    const dt = (now - this.lastTime) / 1000;
    if (dt >= 0.1 && done > this.lastBytes) {
      const instant = (done - this.lastBytes) / dt;
      this.perSecond = this.perSecond === 0 ? instant : 0.7 * this.perSecond + 0.3 * instant;
      this.lastBytes = done;
      this.lastTime = now;
    }
    return this.perSecond;
  }
}

/** `512 MiB of 1.00 GiB · 200 MiB/s · about 3 s left`, as far as known. */
export function byteProgress(done: bigint, total: bigint, perSecond: number): string {
  const parts = [`${bytes(done)} of ${bytes(total)}`];
  if (perSecond > 0) {
    parts.push(`${bytes(perSecond)}/s`);
    const left = Number(total - done) / perSecond;
    if (left > 0) parts.push(`about ${duration(left)} left`);
  }
  return parts.join(" · ");
}
