// Drives the real @segment/analytics-node against splitter for tests/test_clients_node.py.
// Usage: node send-node.js '{"host": "http://127.0.0.1:PORT", "writeKey": "...", "users": ["u1"], "flushAt": 1}'
// Prints one JSON line per HTTP answer the SDK got ({"kind": "response", ...}) as it happens, then
// {"kind": "done", "events": [...every event the SDK built, with its messageId...], "errors": [...]}.
'use strict'
const { Analytics } = require('@segment/analytics-node')

const config = JSON.parse(process.argv[2])
const started = Date.now()
const say = (line) => process.stdout.write(JSON.stringify(line) + '\n')

async function main() {
  const analytics = new Analytics({
    writeKey: config.writeKey,
    host: config.host, // splitter's base URL, no /v1
    path: '/v1/batch',
    flushAt: config.flushAt ?? 1,
    flushInterval: 200,
    maxRetries: 3,
  })
  const errors = []
  const events = []
  analytics.on('error', (err) => errors.push(String(err && (err.reason || err.message || err.code) || err)))
  analytics.on('http_response', (r) => say({
    kind: 'response', status: r.status, retryAfter: r.headers['retry-after'] ?? null, ms: Date.now() - started,
  }))
  const done = (err, ctx) => {
    if (err) errors.push(String(err))
    if (ctx) events.push(ctx.event)
  }
  const unicode = 'Grüße 🚀 — naïve façade 日本語'
  const context = { app: { name: 'shop', version: '5.1.0' }, locale: 'de-DE', campaign: { name: unicode } }
  for (const userId of config.users) {
    analytics.identify({ userId, traits: { name: unicode, plan: 'pro' }, context }, done)
    analytics.track({ userId, event: 'Order Completed', properties: { title: unicode, revenue: 42.5, items: [{ sku: 'A-1', qty: 2 }] }, context }, done)
    analytics.page({ userId, category: 'Docs', name: 'SDK setup', properties: { path: '/docs/sdk', title: unicode }, context }, done)
    analytics.screen({ userId, name: 'Checkout', properties: { step: 3 }, context }, done)
    analytics.group({ userId, groupId: `org-${userId}`, traits: { name: unicode }, context }, done)
    analytics.alias({ userId, previousId: `anon-${userId}`, context }, done)
  }
  await analytics.closeAndFlush({ timeout: config.timeoutMs ?? 20000 })
  say({ kind: 'done', events, errors, ms: Date.now() - started })
}

main().catch((err) => {
  say({ kind: 'done', events: [], errors: ['uncaught: ' + (err && err.stack || err)] })
  process.exitCode = 1
})
