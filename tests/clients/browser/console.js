// Drives splitter's admin console (GET / on the admin port) in headless Debian Chromium for tests/test_console.py.
// Usage: node console.js '{"url": ..., "screenshot": PATH, "token": T|null, "search": TEXT, "explain": {"user": ID, "key": F, "source": S},
//                          "unfold": EVENT NAME|null}'
// Prints one JSON line: what the page shows (parity, catalog, traffic, health and rules as text), the catalog rows the search
// left, the explain box's answer, and everything that would say a client-supplied name ran: dialogs, window.__pwned, CSP
// violations, console messages, page errors and failed requests.
'use strict'
const { chromium } = require('playwright-core')

const config = JSON.parse(process.argv[2])

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic'],
  })
  const console_ = []
  const dialogs = []
  const failed = []
  const requests = []
  try {
    const context = await browser.newContext({ viewport: { width: 1440, height: 1000 }, deviceScaleFactor: 1 })
    const page = await context.newPage()
    // Runs before the page's own script (playwright's init scripts are not subject to the page's CSP).
    await page.addInitScript(() => {
      window.__violations = []
      document.addEventListener('securitypolicyviolation', (e) => {
        window.__violations.push({ directive: e.violatedDirective, blocked: e.blockedURI, sample: e.sample })
      })
    })
    page.on('console', (m) => console_.push(`${m.type()}: ${m.text()}`))
    page.on('pageerror', (e) => console_.push(`pageerror: ${e}`))
    page.on('dialog', async (d) => { dialogs.push(`${d.type()}: ${d.message()}`); await d.dismiss() })
    page.on('request', (r) => requests.push({ url: r.url(), method: r.method(), auth: r.headers()['authorization'] ? 'bearer' : null }))
    page.on('requestfailed', (r) => failed.push(`${r.method()} ${r.url()}: ${(r.failure() || {}).errorText}`))
    page.on('response', (r) => { if (r.status() >= 400) failed.push(`http ${r.status()}: ${r.request().method()} ${r.url()}`) })

    const first = await page.goto(config.url)
    const firstStatus = first.status()
    let lockedText = null
    if (config.token) {
      await page.waitForSelector('#token-form', { state: 'visible', timeout: 10000 })
      lockedText = await page.evaluate(() => document.querySelector('main').innerText)
      await page.fill('#token-input', config.token)
      await page.click('#token-form button')
    }
    // Two polls at least, so the rates have a span; the catalog has been read.
    await page.waitForFunction(() => Number(document.body.dataset.polls || 0) >= 2 && document.body.dataset.catalog === 'ok', null, { timeout: 20000 })

    const shown = await page.evaluate(() => {
      const cells = (row) => Object.fromEntries([...row.querySelectorAll('td[data-col]')].map((td) => [td.dataset.col, td.textContent]))
      return {
        parity: [...document.querySelectorAll('#parity-body tbody tr[data-event]')].map((tr) => ({
          source: tr.dataset.source, type: tr.dataset.type, event: tr.dataset.event, shown_name: tr.querySelector('td.name').textContent, cells: cells(tr),
        })),
        catalog: [...document.querySelectorAll('#catalog-body tbody tr[data-name]')].map((tr) => ({
          source: tr.dataset.source, type: tr.dataset.type, name: tr.dataset.name, shown_name: tr.querySelector('td.name').textContent,
          total: tr.querySelector('td[data-col=total]').textContent,
          paths: [...tr.querySelectorAll('table.paths code')].map((c) => c.textContent),
        })),
        traffic: [...document.querySelectorAll('#traffic-body tbody tr[data-role]')].map((tr) => [...tr.cells].map((td) => td.textContent)),
        health: [...document.querySelectorAll('#health-body tbody tr[data-destination]')].map((tr) => [...tr.cells].map((td) => td.textContent)),
        rules: document.querySelector('#rules-body').innerText,
        history: document.querySelector('#history-body').innerText,
        status: document.querySelector('#live-status').textContent,
        rulesSha: document.querySelector('#rules-sha').textContent,
        // Elements a hostile name would have made if it had been parsed as HTML.
        injected: document.querySelectorAll('main img, main script, main svg, main iframe, main b, main [onerror], main [onload]').length,
      }
    })

    await page.fill('#catalog-q', config.search)
    await page.waitForFunction((n) => document.querySelector('#catalog-count').textContent.includes(' of '), null, { timeout: 5000 })
    const searched = await page.evaluate(() => [...document.querySelectorAll('#catalog-body tbody tr[data-name]')].map((tr) => tr.dataset.name))
    await page.fill('#catalog-q', '')
    await page.waitForFunction(() => !document.querySelector('#catalog-count').textContent.includes(' of '), null, { timeout: 5000 })

    await page.fill('#explain-user', config.explain.user)
    await page.selectOption('#explain-key', config.explain.key)
    await page.selectOption('#explain-source', config.explain.source)
    await page.click('#explain-form button')
    await page.waitForFunction(() => ['done', 'error'].includes(document.querySelector('#explain-result').dataset.state), null, { timeout: 10000 })
    const explained = await page.evaluate(() => ({
      state: document.querySelector('#explain-result').dataset.state,
      fields: Object.fromEntries([...document.querySelectorAll('#explain-result td[data-field]')].map((td) => [td.dataset.field, td.textContent])),
      json: (document.querySelector('#explain-result pre') || {}).textContent || null,
      text: document.querySelector('#explain-result').innerText,
    }))

    if (config.unfold) { // show one event's properties (the hostile paths among them) in the screenshot
      const unfolded = await page.evaluate((name) => {
        const row = [...document.querySelectorAll('#catalog-body tbody tr[data-name]')].find((tr) => tr.dataset.name === name)
        const details = row && row.querySelector('details')
        if (details) details.open = true
        return Boolean(details)
      }, config.unfold)
      if (!unfolded) console_.push(`error: no catalog row to unfold for ${config.unfold}`)
    }
    const unfoldedPaths = await page.evaluate(() => [...document.querySelectorAll('#catalog-body details[open] table.paths code')].map((c) => c.textContent))
    await page.waitForTimeout(3500) // one more poll: the page redraws with its state kept, and nothing has run meanwhile
    await page.screenshot({ path: config.screenshot, fullPage: true })

    const after = await page.evaluate(() => ({
      pwned: window.__pwned === undefined ? null : String(window.__pwned),
      violations: window.__violations,
      injected: document.querySelectorAll('main img, main script, main svg, main iframe, main b, main [onerror], main [onload]').length,
      openAfterRedraw: document.querySelectorAll('#catalog-body details[open]').length,
    }))
    const tokenInUrl = config.token ? requests.filter((r) => r.url.includes(config.token)).map((r) => r.url) : []
    process.stdout.write(JSON.stringify({
      firstStatus, lockedText, shown, searched, explained, unfoldedPaths, after, dialogs, console: console_, failed, tokenInUrl,
      adminRequests: requests.filter((r) => r.url.includes('/admin/')).map((r) => ({ path: new URL(r.url).pathname, auth: r.auth })),
    }) + '\n')
  } finally {
    await browser.close()
  }
}

main().catch((error) => { console.error(error); process.exit(1) })
