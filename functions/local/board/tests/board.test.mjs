// The job board in headless Chromium against the local runner with the simulator.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
const runnerBin = process.env.LOCAL_BIN ?? join(root, "target/debug/local");
const shots = join(root, "target/board");
const database = `mj_board_${process.pid}_${Date.now()}`;

let runner, browser, page, base;

const freePort = () =>
  new Promise((ok) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });

before(async () => {
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  const media = mkdtempSync(join(tmpdir(), "mj-board-"));
  runner = spawn(runnerBin, [], {
    env: {
      ...process.env,
      PORT: String(port),
      DATABASE_URL: `postgres://postgres@127.0.0.1:5432/${database}`,
      GENERATOR: "simulator",
      SIMULATOR_DURATION_MS: "2500",
      MAX_CONCURRENT_JOBS: "1",
      MEDIA_DIR: media,
      SQS_QUEUE_URL: "",
      RUST_LOG: "warn",
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const token = await new Promise((ok, fail) => {
    let out = "";
    runner.stdout.on("data", (chunk) => {
      out += chunk;
      const found = out.match(/export TOKEN=(\S+)/);
      if (found) ok(found[1]);
    });
    runner.on("exit", (code) => fail(new Error(`the local runner exited with ${code}`)));
  });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  await page.goto(base);
  await page.getByLabel("Token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("button", { name: "Sign out" }).waitFor();
});

after(async () => {
  await browser?.close();
  runner?.kill("SIGTERM");
  try {
    execFileSync("psql", ["-h", "127.0.0.1", "-U", "postgres", "-qc", `DROP DATABASE IF EXISTS ${database} WITH (FORCE)`]);
  } catch {}
});

async function start(kind, prompt) {
  await page.getByLabel(kind).check();
  await page.getByLabel("Prompt").fill(prompt);
  const before = await page.locator("#jobs li.card").count();
  await page.getByRole("button", { name: "Start" }).click();
  await page.waitForFunction((n) => document.querySelectorAll("#jobs li.card").length > n, before);
  // Newest first: pin the card by its job id, since later jobs go above it.
  const id = await page.locator("#jobs li.card").first().getAttribute("data-job-id");
  return page.locator(`#jobs li.card[data-job-id="${id}"]`);
}

const badge = (card) => card.locator(".badge");

test("a started job goes from queued or processing to completed, with its image shown", async () => {
  const card = await start("Character image", "a knight with a silver helmet");
  const seen = new Set();
  for (let i = 0; i < 100 && !seen.has("completed"); i++) {
    seen.add(await badge(card).textContent());
    await page.waitForTimeout(100);
  }
  assert.ok(seen.has("queued") || seen.has("processing"), `seen: ${[...seen]}`);
  assert.ok(seen.has("completed"), `seen: ${[...seen]}`);
  const img = card.getByRole("img", { name: "generated character image" });
  await img.waitFor();
  await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, await img.elementHandle());
  assert.equal(await card.getByRole("button", { name: /Cancel/ }).count(), 0, "nothing to cancel when done");
});

test("a queued job can be cancelled from its card", async () => {
  const running = await start("Character image", "keeps the only slot busy");
  const queued = await start("Moodboard", "waits behind it");
  await queued.getByText(/Position \d+ in the queue/).waitFor();
  await queued.getByRole("button", { name: /Cancel/ }).click();
  await badge(queued).filter({ hasText: "cancelled" }).waitFor();
  await badge(running).filter({ hasText: "completed" }).waitFor({ timeout: 15000 });
  assert.equal(await badge(queued).textContent(), "cancelled", "a cancelled job never completes");
});

test("a failing job shows its error", async () => {
  const card = await start("Animation", "please simulate:fail");
  await badge(card).filter({ hasText: "failed" }).waitFor({ timeout: 20000 });
  assert.match(await card.locator(".error").textContent(), /simulated failure/);
});

test("the board reads on a phone-width screen and the screenshot is kept", async () => {
  const card = await start("Moodboard", "misty forest at dawn");
  await badge(card).filter({ hasText: "completed" }).waitFor({ timeout: 20000 });
  mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: join(shots, "board.png"), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `horizontal overflow of ${overflow}px at phone width`);
  await page.screenshot({ path: join(shots, "board-phone.png"), fullPage: true });
  // Keyboard: the start form is reachable and labelled.
  await page.getByLabel("Prompt").focus();
  assert.equal(await page.evaluate(() => document.activeElement.id), "prompt");
});
