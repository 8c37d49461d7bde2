// Opens a page in headless Debian Chromium (playwright-core, no downloaded browser) for tests/test_clients_browser.py
// and tests/test_clients_rudderstack_browser.py.
// Usage: node drive.js PAGE_URL [API_ORIGIN]
// Waits for the page's window.__result, then until every request to API_ORIGIN has been answered
// (quiet for 500 ms), and prints one JSON line: {result, requests: [{method, url, status, auth, type, contentType}],
// offsite: [URLs of requests to neither the page's origin nor API_ORIGIN], console}.
'use strict'
const { chromium } = require('playwright-core')

const [pageUrl, apiOrigin = ''] = process.argv.slice(2)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic'],
  })
  const requests = []
  const log = []
  let pending = 0
  let lastActivity = Date.now()
  try {
    const page = await browser.newPage()
    page.on('console', (m) => log.push(`${m.type()}: ${m.text()}`))
    page.on('pageerror', (e) => log.push(`pageerror: ${e}`))
    page.on('response', (r) => { if (r.status() >= 400) log.push(`http ${r.status()}: ${r.request().method()} ${r.url()}`) })
    const ours = (r) => apiOrigin && r.url().startsWith(apiOrigin)
    const pageOrigin = new URL(pageUrl).origin
    const offsite = []
    page.on('request', (r) => {
      if (ours(r)) { pending += 1; lastActivity = Date.now() } else if (!r.url().startsWith(pageOrigin) && !r.url().startsWith('data:')) offsite.push(r.url())
    })
    const finished = async (r, failure) => {
      if (!ours(r)) return
      const response = failure ? null : await r.response().catch(() => null)
      const headers = await r.allHeaders().catch(() => ({}))
      requests.push({
        method: r.method(), url: r.url(), status: response ? response.status() : null, failure: failure || null,
        auth: headers['authorization'] || null, type: r.resourceType(), contentType: headers['content-type'] || null,
      })
      pending -= 1
      lastActivity = Date.now()
    }
    page.on('requestfinished', (r) => finished(r, null))
    page.on('requestfailed', (r) => finished(r, (r.failure() || {}).errorText || 'failed'))
    await page.goto(pageUrl)
    await page.waitForFunction(() => window.__result !== undefined, null, { timeout: 20000 })
    const result = await page.evaluate(() => window.__result)
    const deadline = Date.now() + 15000
    while (Date.now() < deadline && (pending > 0 || Date.now() - lastActivity < 500)) await sleep(50)
    process.stdout.write(JSON.stringify({ result, requests, pending, offsite, console: log }) + '\n')
  } finally {
    await browser.close()
  }
}

main().catch((error) => { console.error(error); process.exit(1) })
