// Drives the real @rudderstack/rudder-sdk-node against splitter for tests/test_clients_rudderstack_node.py.
// Usage: node send-rudder-node.js '{"dataPlaneUrl": "http://127.0.0.1:PORT", "writeKey": "...", "users": ["u1"], "flushAt": 6}'
// Prints one JSON line per HTTP answer the SDK got ({"kind": "response", status, contentType, contentEncoding,
// authorization, url, events}), decoding the request body exactly as it went on the wire (gzip inflated), then
// {"kind": "done", "errors": [...], "callbacks": N} once every call's callback has run.
'use strict'
const zlib = require('zlib')
const axios = require('axios')
const Analytics = require('@rudderstack/rudder-sdk-node')

const config = JSON.parse(process.argv[2])
const started = Date.now()
const say = (line) => process.stdout.write(JSON.stringify(line) + '\n')

// The SDK's own axios instance would do; one made here lets the test see each request as sent.
const axiosInstance = axios.create()
const record = (response) => {
  const sent = response.config
  const headers = sent.headers || {}
  let body = sent.data
  if (Buffer.isBuffer(body)) body = (headers['Content-Encoding'] === 'gzip' ? zlib.gunzipSync(body) : body).toString('utf8')
  say({
    kind: 'response', status: response.status, ms: Date.now() - started, url: sent.url,
    contentType: headers['Content-Type'] ?? null, contentEncoding: headers['Content-Encoding'] ?? null,
    authorization: headers.Authorization ?? null, events: JSON.parse(body).batch, answer: response.data,
  })
}
axiosInstance.interceptors.response.use(
  (response) => { record(response); return response },
  (error) => { if (error.response) record(error.response); return Promise.reject(error) },
)

async function main() {
  const errors = []
  const client = new Analytics(config.writeKey, {
    dataPlaneUrl: config.dataPlaneUrl, // splitter's base URL, no /v1: the SDK posts to dataPlaneUrl + '/v1/batch'
    flushAt: config.flushAt ?? 6,
    flushInterval: 200,
    retryCount: 2,
    logLevel: 'error',
    axiosInstance,
    errorHandler: (err) => errors.push(String(err && (err.message || err.code) || err)),
  })
  let callbacks = 0
  const done = (err) => { callbacks += 1; if (err) errors.push(String(err)) }
  const unicode = 'Grüße 🚀 — naïve façade 日本語'
  const context = { app: { name: 'shop', version: '5.1.0' }, locale: 'de-DE', campaign: { name: unicode } }
  for (const userId of config.users) {
    client.identify({ userId, traits: { name: unicode, plan: 'pro' }, context }, done)
    client.track({ userId, event: 'Order Completed', properties: { title: unicode, revenue: 42.5, items: [{ sku: 'A-1', qty: 2 }] }, context }, done)
    client.page({ userId, category: 'Docs', name: 'SDK setup', properties: { path: '/docs/sdk', title: unicode }, context }, done)
    client.screen({ userId, name: 'Checkout', properties: { step: 3 }, context }, done)
    client.group({ userId, groupId: `org-${userId}`, traits: { name: unicode }, context }, done)
    client.alias({ userId, previousId: `anon-${userId}`, context }, done)
  }
  const expected = config.users.length * 6
  const deadline = Date.now() + (config.timeoutMs ?? 20000)
  while (callbacks < expected && Date.now() < deadline) {
    await client.flush().catch((err) => errors.push(String(err && err.message || err)))
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  say({ kind: 'done', errors, callbacks, expected, ms: Date.now() - started })
}

main().catch((err) => {
  say({ kind: 'done', errors: ['uncaught: ' + (err && err.stack || err)], callbacks: 0 })
  process.exitCode = 1
})
