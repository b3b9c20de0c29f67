// Drives the operator console in a real browser: the machine's Chromium (Debian's
// `chromium` package) through playwright-core, never a downloaded browser. Run by
// services/tanjiren/tests/processes/console.rs, which starts Tanjiren, makes the
// tokens, a doctrine that holds tasks whose command says "guarded", a schedule that
// fires every two seconds, and checks on the server side what this script did.
//
// Environment: CONSOLE_URL, ADMIN_TOKEN, MEMBER_TOKEN, OWNER_LINK (a one-time
// sign-in link), WORKSTATION, SCHEDULE (a schedule's name), SHOTS (a directory for
// screenshots), CHROMIUM (default /usr/bin/chromium).
// Output: one JSON line per scenario ({"scenario", "ok", "ms"} or "error"), then
// {"done": true, "tasks": {...}} with the ids of the tasks it made. Exit 1 on the
// first failure (with a screenshot of the page as it was).

import { chromium } from "playwright-core";
import { strict as assert } from "node:assert";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("CONSOLE_URL");
const shots = env("SHOTS");
const workstation = env("WORKSTATION");
mkdirSync(shots, { recursive: true });

const WAIT = 45_000;
const tasks = {};
let current = null;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

async function scenario(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    console.log(JSON.stringify({ scenario: name, ok: true, ms: Date.now() - t0 }));
  } catch (e) {
    console.log(JSON.stringify({ scenario: name, ok: false, error: String(e && e.stack ? e.stack : e) }));
    if (current) {
      await current.screenshot({ path: join(shots, "failure.png"), fullPage: true }).catch(() => {});
      const html = await current.content().catch(() => "");
      console.log(JSON.stringify({ scenario: name, url: current.url(), page: html.slice(0, 4000) }));
    }
    await browser.close();
    process.exit(1);
  }
}

async function shot(page, name) {
  const path = join(shots, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  console.log(JSON.stringify({ screenshot: path }));
}

/** Waits until the element `selector` contains `text`. */
async function waitText(page, selector, text, timeout = WAIT) {
  await page.waitForFunction(
    ([s, t]) => Array.from(document.querySelectorAll(s)).some((e) => e.textContent.includes(t)),
    [selector, text],
    { timeout },
  );
}

async function signIn(context, token) {
  const page = await context.newPage();
  current = page;
  await page.goto(`${base}/tasks`);
  assert.match(new URL(page.url()).pathname, /^\/sign-in/, "an anonymous visit is sent to sign in");
  await page.fill("#token", token);
  await Promise.all([page.waitForURL(/\/tasks$/), page.click("section.sign-in button[type=submit]")]);
  return page;
}

/** Creates a task through the form; returns its id (the page is left on the task). */
async function createTask(page, intent, command) {
  await page.goto(`${base}/tasks/new`);
  await page.fill("input[name=intent]", intent);
  await page.check("input[name=mode][value=command]");
  await page.fill("textarea[name=payload]", command);
  await page.fill("input[name=targets]", workstation);
  await Promise.all([page.waitForURL(/\/tasks\/[0-9a-f-]{36}$/), page.click("#new-task button[type=submit]")]);
  return page.url().split("/").pop();
}

/** The status badge of the task page's summary. */
const summaryStatus = "#summary .status-line .badge";

const admin = await browser.newContext({ acceptDownloads: true });
let page;

await scenario("sign in with an API token", async () => {
  page = await signIn(admin, env("ADMIN_TOKEN"));
  await waitText(page, "header .who", "admin");
  const cookie = (await admin.cookies()).find((c) => c.name === "tanjiren_session");
  assert.ok(cookie, "a session cookie is set");
  assert.equal(cookie.httpOnly, true, "HttpOnly");
  assert.equal(cookie.sameSite, "Strict", "SameSite=Strict");
  assert.ok(!cookie.value.includes("tjr_"), "the token is not readable in the cookie");
  const res = await page.goto(`${base}/tasks`);
  const csp = res.headers()["content-security-policy"] || "";
  assert.match(csp, /script-src 'self'/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
  await shot(page, "tasks");
});

await scenario("sign in with the one-time link from tanjiren up", async () => {
  const owner = await browser.newContext();
  const p = await owner.newPage();
  current = p;
  await p.goto(env("OWNER_LINK"));
  await shot(p, "sign-in-link");
  await Promise.all([p.waitForURL(/\/tasks$/), p.click("section.sign-in button[type=submit]")]);
  await waitText(p, "header .who .role", "owner");
  // The link works once.
  const again = await browser.newContext();
  const q = await again.newPage();
  current = q;
  await q.goto(env("OWNER_LINK"));
  await q.click("section.sign-in button[type=submit]");
  await waitText(q, "p.error", "already used");
  await owner.close();
  await again.close();
  current = page;
});

await scenario("create a command task and watch its output arrive live", async () => {
  await page.goto(`${base}/tasks/new`);
  await page.fill("input[name=intent]", "console live output");
  // The second line waits for a file this script makes once it has seen the first
  // live (the worker runs on this machine), so "live" holds however loaded it is.
  const gate = join(shots, `gate-${Date.now()}`);
  await page.fill(
    "textarea[name=payload]",
    `echo first-line; while [ ! -e '${gate}' ]; do sleep 0.2; done; echo second-line; echo to-stderr >&2`,
  );
  await page.fill("input[name=targets]", workstation);
  await page.click("text=Check doctrine");
  await waitText(page, "#dry-run", "No rule matches");
  await shot(page, "new-task");
  await Promise.all([page.waitForURL(/\/tasks\/[0-9a-f-]{36}$/), page.click("#new-task button[type=submit]")]);
  tasks.live = page.url().split("/").pop();
  await waitText(page, "pre.output", "first-line");
  const early = await page.textContent("pre.output");
  assert.ok(!early.includes("second-line"), "the first line arrived while the task was still running");
  await waitText(page, summaryStatus, "executing");
  writeFileSync(gate, "");
  await waitText(page, "pre.output", "second-line");
  await waitText(page, "pre.output .ln-err", "to-stderr");
  await waitText(page, summaryStatus, "completed");
  await waitText(page, ".step-meta dd.exit", "0");
  await page.waitForTimeout(300);
  await shot(page, "task");
  // The deduplicated view, one click away.
  await page.click("text=Deduplicated view");
  await waitText(page, "table.dedup", "second-line");
  await shot(page, "output-dedup");
  // The raw log downloads.
  await page.goBack();
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("text=Download raw log")]);
  const raw = readFileSync(await download.path(), "utf8");
  assert.match(raw, /stdout first-line\n/);
  assert.match(raw, /stderr to-stderr\n/);
});

await scenario("the task list updates by itself", async () => {
  await page.goto(`${base}/tasks?text=live-list`);
  await waitText(page, "#task-table", "No tasks match");
  const other = await admin.newPage();
  await createTask(other, "console live-list entry", "sleep 1");
  current = page;
  await waitText(page, "#task-table td.intent", "console live-list entry");
  await waitText(page, "#task-table tr[data-task-id] .badge", "completed");
  await other.close();
});

await scenario("cancel a running task", async () => {
  tasks.cancelled = await createTask(page, "console cancel me", "echo started; sleep 60");
  await waitText(page, "pre.output", "started");
  await waitText(page, summaryStatus, "executing");
  await page.fill("form.cancel input[name=reason]", "stopped from the console");
  await Promise.all([page.waitForURL(new RegExp(`/tasks/${tasks.cancelled}$`)), page.click("text=Cancel task")]);
  await waitText(page, summaryStatus, "cancelled");
  await waitText(page, "#summary", "stopped from the console");
});

await scenario("a script in a task's output is shown as text", async () => {
  tasks.script = await createTask(
    page,
    "console escaping",
    `echo '<script>document.title="pwned"</script><b id="injected">bold</b>'`,
  );
  await waitText(page, "pre.output", '<script>document.title="pwned"</script>');
  await waitText(page, summaryStatus, "completed");
  assert.notEqual(await page.title(), "pwned");
  assert.equal(await page.locator("#injected").count(), 0, "no element was made from the output");
  const html = await page.innerHTML("pre.output");
  assert.ok(html.includes("&lt;script&gt;"), html);
  // A note is Markdown, rendered safely.
  await page.fill("form.note input[name=title]", "console note");
  await page.fill("form.note textarea[name=body]", "**bold finding**\n\n<script>document.title='pwned'</script>");
  await Promise.all([page.waitForURL(/#artifacts$/), page.click("text=Add note")]);
  await waitText(page, "article.artifact[data-kind=note] strong", "bold finding");
  await waitText(page, "article.artifact[data-kind=note] .markdown", "<script>");
  assert.notEqual(await page.title(), "pwned");
});

await scenario("approve a held task and see it run", async () => {
  await page.goto(`${base}/tasks/new`);
  await page.fill("input[name=intent]", "guarded deploy from the console");
  await page.fill("textarea[name=payload]", "echo guarded approved-run");
  await page.fill("input[name=targets]", workstation);
  await page.click("text=Check doctrine");
  await waitText(page, "#dry-run", "sensitive_write");
  await waitText(page, "#dry-run", "guarded");
  await Promise.all([page.waitForURL(/\/tasks\/[0-9a-f-]{36}$/), page.click("#new-task button[type=submit]")]);
  tasks.approved = page.url().split("/").pop();
  await waitText(page, "#summary", "pending");
  await page.goto(`${base}/approvals`);
  const held = page.locator(`article.held[data-task-id="${tasks.approved}"]`);
  await held.waitFor({ timeout: WAIT });
  assert.ok((await held.textContent()).includes("echo guarded approved-run"), "the exact payload is shown");
  await shot(page, "approvals");
  await held.locator("form.approve input[name=reason]").fill("looks right");
  await Promise.all([
    page.waitForURL(new RegExp(`/tasks/${tasks.approved}$`)),
    held.locator("button.approve").click(),
  ]);
  await waitText(page, "pre.output", "approved-run");
  await waitText(page, summaryStatus, "completed");
  await waitText(page, "ul.decisions", "looks right");
});

await scenario("reject a held task with a reason", async () => {
  tasks.rejected = await createTask(page, "guarded rollout from the console", "echo guarded must-not-run");
  await page.goto(`${base}/approvals`);
  const held = page.locator(`article.held[data-task-id="${tasks.rejected}"]`);
  await held.waitFor({ timeout: WAIT });
  await held.locator("form.reject input[name=reason]").fill("not during the freeze");
  await Promise.all([page.waitForURL(/\/approvals$/), held.locator("button.danger").click()]);
  // It leaves the queue (the page refreshes on the task's change).
  await held.waitFor({ state: "detached", timeout: WAIT });
  await page.goto(`${base}/tasks/${tasks.rejected}`);
  await waitText(page, "#summary", "rejected");
  await waitText(page, "ul.decisions", "not during the freeze");
});

await scenario("a member cannot see the approve button", async () => {
  tasks.member_view = await createTask(page, "guarded change a member sees", "echo guarded never");
  const memberContext = await browser.newContext();
  const member = await signIn(memberContext, env("MEMBER_TOKEN"));
  await member.goto(`${base}/approvals`);
  const held = member.locator(`article.held[data-task-id="${tasks.member_view}"]`);
  await held.waitFor({ timeout: WAIT });
  assert.equal(await member.locator("button.approve").count(), 0, "no approve button for a member");
  assert.equal(await member.locator("form.reject").count(), 0, "no reject form for a member");
  await waitText(member, ".role-note", "only an admin or owner");
  await shot(member, "approvals-member");
  // The services refuse it too, whatever the page shows.
  const status = await member.evaluate(async (id) => {
    const csrf = JSON.parse(document.body.getAttribute("hx-headers"))["x-csrf-token"];
    const r = await fetch(`/approvals/${id}/approve`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded", "x-csrf-token": csrf },
      body: "reason=sneaky",
    });
    return r.status;
  }, tasks.member_view);
  assert.equal(status, 403, "approving as a member is forbidden");
  // A form without the CSRF token is refused before anything runs.
  const forged = await member.request.post(`${base}/tasks/new`, {
    form: { intent: "forged", mode: "command", payload: "true", targets: workstation },
  });
  assert.equal(forged.status(), 403);
  await memberContext.close();
  current = page;
});

await scenario("open a schedule's ledger", async () => {
  await page.goto(`${base}/schedules`);
  await shot(page, "schedules");
  await Promise.all([page.waitForURL(/\/schedules\/[0-9a-f-]{36}$/), page.click(`text=${env("SCHEDULE")}`)]);
  await waitText(page, "table.ledger", "fired");
  await waitText(page, "ol.next-runs", "UTC");
  await shot(page, "schedule");
  await page.click("button:has-text('Pause')");
  await waitText(page, "h1 .badge", "paused");
});

await scenario("fleet, overview and investigations", async () => {
  await page.goto(`${base}/fleet`);
  await waitText(page, "table.fleet", workstation);
  assert.equal(await page.locator("svg.chart").count(), 2, "throughput and duration charts");
  assert.ok((await page.locator("svg.chart rect").count()) > 0, "the throughput chart has bars");
  await shot(page, "fleet");
  await page.goto(`${base}/investigations`);
  await shot(page, "investigations");
  const first = page.locator("table.investigations a").first();
  await Promise.all([page.waitForURL(/\/investigations\/[0-9a-f-]{36}$/), first.click()]);
  await waitText(page, "main", "Evidence by question");
  await shot(page, "investigation");
});

await scenario("sign out", async () => {
  await Promise.all([page.waitForURL(/\/sign-in$/), page.click("text=Sign out")]);
  await shot(page, "sign-in");
  await page.goto(`${base}/approvals`);
  assert.match(new URL(page.url()).pathname, /^\/sign-in/);
});

console.log(JSON.stringify({ done: true, tasks }));
await browser.close();
