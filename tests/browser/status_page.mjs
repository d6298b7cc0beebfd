// The status page in a real browser (Debian's chromium, headless, driven by playwright-core).
// Env: ADMIN (http://127.0.0.1:port), TOKEN, DATAFLOW (one that delivers), SCREENSHOT (path),
// CHROMIUM (binary). Prints "ok" and exits 0 when every step held; throws otherwise.
import { chromium } from "playwright-core";

const { ADMIN, TOKEN, DATAFLOW, SCREENSHOT } = process.env;
const submit = (page, selector) => Promise.all([page.waitForNavigation(), page.click(selector)]);
const must = (cond, what) => { if (!cond) throw new Error(`expected: ${what}`); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--headless=new"],
});
try {
  const context = await browser.newContext();
  const page = await context.newPage();

  // Without a login session the page sends us to the login form.
  await page.goto(`${ADMIN}/ui`);
  must(page.url().endsWith("/ui/login"), `redirected to the login form, at ${page.url()}`);

  // A wrong token is refused; the right one is exchanged for a cookie the page can't read.
  await page.fill("input[name=token]", "not-the-token");
  await submit(page, "button[type=submit]");
  must((await page.content()).includes("That token is not valid."), `a wrong token refused: ${await page.content()}`);
  await page.fill("input[name=token]", TOKEN);
  await submit(page, "button[type=submit]");
  await page.waitForSelector("#dataflows");
  const [cookie] = await context.cookies();
  must(cookie && cookie.httpOnly && cookie.sameSite === "Strict" && cookie.path === "/ui", `an HttpOnly, SameSite=Strict cookie: ${JSON.stringify({ ...cookie, value: "…" })}`);
  must(!(await page.content()).includes(TOKEN), "the token is never on the page");

  const delivered = async () => {
    await page.goto(`${ADMIN}/ui`);
    return Number(await page.textContent(`tr[data-dataflow="${DATAFLOW}"] td.delivered`));
  };
  const before = await delivered();
  const body = Array.from({ length: 3 }, (_, i) =>
    JSON.stringify({ profileId: `browser-${Date.now()}-${i}`, segments: [{ id: "s1", status: "realized" }] })).join("\n") + "\n";
  const ingest = await fetch(`${ADMIN}/v1/profiles`, { method: "POST", headers: { authorization: `Bearer ${TOKEN}` }, body });
  must(ingest.ok, `ingest answered ${ingest.status}`);
  let after = before;
  for (let i = 0; i < 100 && after < before + 3; i++) {
    await new Promise((r) => setTimeout(r, 100));
    after = await delivered();
  }
  must(after >= before + 3, `the delivered count rose from ${before} (now ${after})`);

  // Replay a dead letter from the page.
  const replay = await page.$("#dead-letters button[id^=replay-]");
  must(replay, "a dead letter with a replay button");
  const id = (await replay.getAttribute("id")).slice("replay-".length);
  await Promise.all([page.waitForNavigation(), replay.click()]);
  await page.waitForSelector("#notice");
  must((await page.textContent("#notice")).includes("replayed and delivered"), `the replay notice: ${await page.textContent("#notice")}`);
  must(!(await page.$(`#replay-${id}`)), "the replayed dead letter is gone from the list");
  await page.screenshot({ path: SCREENSHOT, fullPage: true });

  // A cross-site form POST (from another origin, with the login session's cookie in the jar)
  // is refused.
  const evil = await context.newPage();
  await evil.setContent(`<form method="post" action="${ADMIN}/ui/dataflows/${DATAFLOW}/pause">
    <input name="csrf" value="guess"><button type="submit">go</button></form>`);
  await submit(evil, "button");
  must((await evil.content()).includes("cross-site request refused"), `cross-site POST refused: ${await evil.content()}`);
  await page.goto(`${ADMIN}/ui`);
  must((await page.textContent(`tr[data-dataflow="${DATAFLOW}"] span`)) !== "paused", "the dataflow was not paused");

  // Without the cookie the page and its actions are refused.
  const fresh = await browser.newContext();
  const anon = await fresh.newPage();
  const res = await anon.request.post(`${ADMIN}/ui/dead-letters/1/replay`, { form: { csrf: "x" }, maxRedirects: 0 });
  must(res.status() === 401, `a POST without the cookie: ${res.status()}`);
  await anon.goto(`${ADMIN}/ui`);
  must(anon.url().endsWith("/ui/login"), "no page without the cookie");
  console.log("ok");
} finally {
  await browser.close();
}
