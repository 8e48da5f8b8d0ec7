// Bundles src/ into dist/ (or the folder given): index.html as written, app.js and app.css
// minified, no source maps. Deterministic: the same sources give the same bytes.
import { copyFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { build } from "esbuild";

const out = process.argv[2] ?? "dist";
mkdirSync(out, { recursive: true });
const common = { bundle: true, minify: true, sourcemap: false, legalComments: "none", logLevel: "warning" };
await build({ ...common, entryPoints: ["src/app.ts"], outfile: join(out, "app.js"), format: "esm", target: "es2022" });
await build({ ...common, entryPoints: ["src/app.css"], outfile: join(out, "app.css") });
copyFileSync("src/index.html", join(out, "index.html"));
