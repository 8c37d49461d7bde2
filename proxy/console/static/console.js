// splitter console: keeps the server-rendered page current. Served from the package; no build step, no CDN.
//
// Every few seconds it reads GET /admin/console (rules, traffic, delivery health, parity, history) and,
// less often, GET /admin/console?part=catalog, and rebuilds the sections from that JSON. Nodes are made
// with createElement and text nodes only: event names and property paths came from clients, so nothing
// here ever parses a string as HTML (no innerHTML, no insertAdjacentHTML, no document.write), and no
// attribute that can load or run anything is set from data.
//
// The admin token (when the port requires one) is asked for by the page, kept in this tab's
// sessionStorage and sent as `Authorization: Bearer`: never in a URL.
'use strict'
;(function () {
  const TOKEN_KEY = 'splitter-admin-token'
  const POLL_MS = 3000
  const CATALOG_EVERY = 4 // polls: the catalog is read every 4th time (12 s)
  let token = sessionStorage.getItem(TOKEN_KEY) || ''
  let catalog = null // the catalog's rows as /admin/console?part=catalog gives them
  let polls = 0
  let timer = null
  const openPaths = new Set() // catalog rows whose properties are unfolded, kept across redraws

  const $ = (id) => document.getElementById(id)

  class Locked extends Error {}

  // An element with attributes (names written here, values set as inert strings) and children (nodes or text).
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag)
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue
      node.setAttribute(name, value === true ? '' : String(value))
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue
      node.append(child instanceof Node ? child : document.createTextNode(String(child)))
    }
    return node
  }

  const num = (value) => h('td', { class: 'num' }, value)
  const percents = (split) => Object.entries(split).map(([name, value]) => `${name} ${Number(value)} %`).join(', ')

  function headers() {
    return token ? { Authorization: `Bearer ${token}` } : {}
  }

  async function request(path, options) {
    const response = await fetch(path, { cache: 'no-store', credentials: 'same-origin', ...options, headers: { ...headers(), ...(options || {}).headers } })
    if (response.status === 401) throw new Locked('the admin token was refused')
    const body = await response.json().catch(() => null)
    if (!response.ok) throw new Error((body && body.message) || `${path}: HTTP ${response.status}`)
    return body
  }

  // -- sections ---------------------------------------------------------------------------------------
  function renderRules(r) {
    $('rules-sha').textContent = r.sha256.slice(0, 12)
    const rows = r.rules.map((rule, index) => h('tr', { 'data-rule': rule.name },
      num(index + 1), h('td', null, rule.name), h('td', null, rule.when),
      h('td', null, rule.to.length ? `to ${rule.to.join(', ')}` : null, Object.keys(rule.split).length ? `split ${percents(rule.split)}` : null,
        rule.mirror.length ? [h('br'), `mirror to ${rule.mirror.join(', ')}`] : null),
      h('td', null, rule.cohort),
      h('td', null, rule.ramp
        ? [h('ol', { class: 'ramp' }, rule.ramp.steps.map((step) => h('li', { class: step.now ? 'now' : null },
            `${step.at}: ${percents(step.split)}${step.now ? ' ← now' : ''}`))),
          rule.ramp.next_step_at ? h('span', { class: 'meta' }, `next step ${rule.ramp.next_step_at}`) : null]
        : h('span', { class: 'meta' }, 'none'))))
    $('rules-body').replaceChildren(
      h('p', { class: 'meta' }, 'file ', h('code', null, r.file), ' · sha256 ', h('code', null, r.sha256.slice(0, 12)), ` · loaded ${r.loaded_at}`),
      h('table', { class: 'rules' },
        h('thead', null, h('tr', null, ['#', 'rule', 'when', 'route', 'cohort key', 'ramp'].map((t) => h('th', null, t)))),
        h('tbody', null, rows)),
      h('h3', null, 'Destinations'),
      h('table', null, h('thead', null, h('tr', null, h('th', null, 'destination'), h('th', null, 'kind'), h('th', null, 'url'))),
        h('tbody', null, r.destinations.map((d) => h('tr', null, h('td', null, d.name), h('td', null, d.kind), h('td', null, h('code', null, d.url)))))),
      h('p', { class: 'meta' }, `sources: ${r.sources.length ? r.sources.join(', ') : 'none'}`))
  }

  function renderTraffic(rows) {
    const body = rows.length
      ? rows.map((row) => h('tr', { 'data-destination': row.destination, 'data-role': row.role },
          h('td', null, row.destination), h('td', null, row.role), num(row.per_second === null ? '—' : row.per_second), num(row.total)))
      : h('tr', null, h('td', { colspan: 4, class: 'meta' }, 'no events routed yet'))
    $('traffic-body').replaceChildren(h('table', null,
      h('thead', null, h('tr', null, h('th', null, 'destination'), h('th', null, 'role'), h('th', { class: 'num' }, 'events/s'), h('th', { class: 'num' }, 'total'))),
      h('tbody', null, body)))
  }

  function renderHealth(rows) {
    const titles = ['spooled', 'oldest pending, s', 'in flight', 'delivered', 'dead letters', 'dropped']
    $('health-body').replaceChildren(h('table', null,
      h('thead', null, h('tr', null, h('th', null, 'destination'), h('th', null, 'breaker'), titles.map((t) => h('th', { class: 'num' }, t)))),
      h('tbody', null, rows.map((row) => h('tr', { 'data-destination': row.destination },
        h('td', null, row.destination), h('td', { class: `breaker-${row.breaker}` }, row.breaker),
        ['spool_records', 'oldest_pending_seconds', 'in_flight', 'delivered', 'dead_lettered', 'dropped'].map((f) => num(row[f])))))))
  }

  function renderParity(p) {
    if (p === null) {
      $('parity-body').replaceChildren(h('p', { class: 'meta' }, 'no delivery ledger in this process'))
      return
    }
    const columns = ['accepted', 'delivered', 'pending', 'dead_lettered']
    const rows = p.events.map((e) => {
      const f = e.fanout
      return h('tr', { 'data-source': e.source, 'data-type': e.type, 'data-event': e.event },
        h('td', { class: 'nowrap' }, e.source), h('td', { class: 'nowrap' }, e.type), h('td', { class: 'name' }, e.event),
        p.destinations.map((d) => columns.map((c) => h('td', { class: 'num', 'data-col': `${d}.${c}` }, e.destinations[d] ? e.destinations[d][c] : ''))),
        h('td', { class: 'num', 'data-col': 'fanout.reached_all' }, f ? f.reached_all : ''),
        h('td', { class: 'num', 'data-col': 'fanout.reached_some' }, f ? f.reached_some : ''),
        h('td', { class: 'num', 'data-col': 'fanout.reached_none' }, f ? f.reached_none : ''),
        h('td', { class: 'num', 'data-col': 'fanout.in_flight' }, f ? f.in_flight_some + f.in_flight_none : ''))
    })
    $('parity-body').replaceChildren(
      h('p', { class: 'meta' }, `since ${p.since}: per destination, events accepted (spooled), delivered, pending and dead-lettered; for events sent to ` +
        'several destinations, how many reached all of them, only some, none (settled), and those still in flight.'),
      h('table', { class: 'parity' },
        h('thead', null,
          h('tr', null, ['source', 'type', 'event'].map((t) => h('th', { rowspan: 2 }, t)), p.destinations.map((d) => h('th', { colspan: 4 }, d)),
            h('th', { colspan: 4 }, 'fan-out')),
          h('tr', null, p.destinations.map(() => ['accepted', 'delivered', 'pending', 'dead'].map((t) => h('th', { class: 'num' }, t))),
            ['all', 'some', 'none', 'in flight'].map((t) => h('th', { class: 'num' }, t)))),
        h('tbody', null, rows.length ? rows : h('tr', null, h('td', { colspan: 7 + 4 * p.destinations.length, class: 'meta' }, 'no events yet')))))
  }

  function renderHistory(rows, error) {
    let content
    if (rows === null) content = h('p', { class: 'meta' }, 'no change history in this process')
    else if (error) content = h('p', { class: 'error' }, error)
    else {
      content = h('table', null,
        h('thead', null, h('tr', null, ['time', 'trigger', 'status', 'sha256', 'what changed'].map((t) => h('th', null, t)))),
        h('tbody', null, rows.length
          ? rows.map((row) => h('tr', { class: `status-${row.status}` }, h('td', { class: 'nowrap' }, row.time), h('td', null, row.trigger), h('td', null, row.status),
              h('td', null, h('code', null, row.sha256)), h('td', null, row.lines.length ? h('ul', null, row.lines.map((line) => h('li', null, line))) : null)))
          : h('tr', null, h('td', { colspan: 5, class: 'meta' }, 'no changes recorded'))))
    }
    $('history-body').replaceChildren(content)
  }

  function renderCatalog() {
    if (catalog === null) {
      $('catalog-body').replaceChildren(h('p', { class: 'meta' }, 'no event catalog in this process'))
      return
    }
    const needle = $('catalog-q').value.trim().toLowerCase()
    const byName = $('catalog-sort').value === 'name'
    let rows = catalog.filter((e) => !needle || e.name.toLowerCase().includes(needle) || e.paths.some((p) => p.path.toLowerCase().includes(needle)))
    rows = rows.slice().sort(byName
      ? (a, b) => a.name.toLowerCase().localeCompare(b.name.toLowerCase()) || a.source.localeCompare(b.source) || a.type.localeCompare(b.type)
      : (a, b) => b.total - a.total || a.source.localeCompare(b.source) || a.type.localeCompare(b.type) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    const body = rows.map((e) => {
      const key = `${e.source}\u0000${e.type}\u0000${e.name}`
      let properties = h('span', { class: 'meta' }, 'none')
      if (e.paths.length) {
        properties = h('details', { open: openPaths.has(key) }, h('summary', null, `${e.paths.length} path${e.paths.length === 1 ? '' : 's'}`),
          h('table', { class: 'paths' }, h('tbody', null, e.paths.map((p) => h('tr', null, h('td', null, h('code', null, p.path)),
            h('td', null, p.types, p.mixed ? [' ', h('strong', { class: 'mixed' }, 'mixed')] : null), num(p.seen))))))
        properties.addEventListener('toggle', () => { if (properties.open) openPaths.add(key); else openPaths.delete(key) })
      }
      return h('tr', { 'data-source': e.source, 'data-type': e.type, 'data-name': e.name },
        h('td', { class: 'nowrap' }, e.source), h('td', { class: 'nowrap' }, e.type), h('td', { class: 'name' }, e.name),
        h('td', { class: 'num', 'data-col': 'total' }, e.total), num(e.last_hour), num(e.last_24h), h('td', { class: 'nowrap' }, e.last_seen || ''), h('td', null, e.routed),
        h('td', null, properties))
    })
    $('catalog-body').replaceChildren(
      h('p', { class: 'meta', id: 'catalog-count' }, `${rows.length} events${rows.length !== catalog.length ? ` of ${catalog.length}` : ''}`),
      h('table', { class: 'catalog' },
        h('thead', null, h('tr', null, ['source', 'type', 'event'].map((t) => h('th', null, t)),
          ['total', 'last hour', 'last 24 h'].map((t) => h('th', { class: 'num' }, t)), ['last seen', 'destinations', 'properties and types'].map((t) => h('th', null, t)))),
        h('tbody', null, body.length ? body : h('tr', null, h('td', { colspan: 9, class: 'meta' }, needle ? 'no event matches' : 'no events yet')))))
    document.body.dataset.catalog = 'ok'
  }

  function fillExplainForm(explain) {
    const source = $('explain-source')
    const offered = JSON.stringify([explain.sources, explain.id_fields, explain.region])
    if (source.dataset.offered === offered) return
    source.dataset.offered = offered
    source.replaceChildren(h('option', { value: '' }, '(from the event)'), ...explain.sources.map((s) => h('option', { value: s }, s)))
    $('explain-key').replaceChildren(...explain.id_fields.map((f) => h('option', { value: f }, f)))
    $('explain-region').placeholder = explain.region || ''
  }

  // -- refreshing -------------------------------------------------------------------------------------
  function status(text, ok) {
    const node = $('live-status')
    node.textContent = text
    node.className = ok ? 'live' : 'stale'
  }

  async function refresh() {
    const withCatalog = polls % CATALOG_EVERY === 0
    const [model, part] = await Promise.all([request('/admin/console'), withCatalog ? request('/admin/console?part=catalog') : null])
    $('generated-at').textContent = model.generated_at
    renderRules(model.rules)
    renderTraffic(model.traffic)
    renderHealth(model.health)
    renderParity(model.parity)
    renderHistory(model.history, model.history_error)
    fillExplainForm(model.explain)
    if (part !== null) {
      catalog = part.catalog
      renderCatalog()
    }
    polls += 1
    document.body.dataset.live = 'ok'
    document.body.dataset.polls = String(polls)
    status(`live · updated ${new Date().toLocaleTimeString()}`, true)
  }

  async function tick() {
    timer = null
    if (!document.hidden) {
      try {
        await refresh()
      } catch (error) {
        if (error instanceof Locked) {
          lock(token ? error.message : '')
          return
        }
        status(`not updating: ${error.message} (retrying)`, false)
      }
    }
    timer = setTimeout(tick, POLL_MS)
  }

  function lock(message) {
    if (timer !== null) clearTimeout(timer)
    timer = null
    token = ''
    sessionStorage.removeItem(TOKEN_KEY)
    document.body.dataset.locked = '1'
    $('token').hidden = false
    $('token-error').textContent = message
    status('locked', false)
  }

  function unlock() {
    document.body.dataset.locked = '0'
    $('token').hidden = true
    polls = 0
    tick()
  }

  // -- forms --------------------------------------------------------------------------------------------
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault()
    token = $('token-input').value.trim()
    $('token-input').value = ''
    if (token) sessionStorage.setItem(TOKEN_KEY, token)
    unlock()
  })

  $('catalog-form').addEventListener('submit', (event) => {
    event.preventDefault()
    if (catalog !== null) renderCatalog()
  })
  for (const id of ['catalog-q', 'catalog-sort']) $(id).addEventListener('input', () => { if (catalog !== null) renderCatalog() })

  $('explain-form').addEventListener('submit', async (event) => {
    event.preventDefault()
    const out = $('explain-result')
    out.dataset.state = 'asking'
    const question = {}
    for (const name of ['event', 'user', 'key', 'source', 'country', 'region']) question[name] = $(`explain-${name}`).value
    try {
      const answer = await request('/admin/explain', { method: 'POST', body: JSON.stringify(question), headers: { 'Content-Type': 'application/json' } })
      if (!answer.results.length) out.replaceChildren(h('p', { class: 'meta' }, 'no events in the question'))
      else out.replaceChildren(...answer.results.map((result) => {
        const d = result.decision
        const c = result.context
        return h('div', { class: 'explained' },
          h('table', null, h('tbody', null,
            [['rule', d.rule], ['bucket', d.bucket === null ? '— (no split)' : d.bucket], ['cohort_key', d.cohort_key === null ? '—' : d.cohort_key],
              ['primary', d.primary.join(', ')], ['mirror', d.mirror.join(', ') || 'none'],
              ['context', `source ${c.source || '—'}, country ${c.country || '—'}, region ${c.region || '—'}`], ['event', JSON.stringify(result.event)]]
              .map(([label, value]) => h('tr', null, h('th', null, label), h('td', { 'data-field': label }, value))))),
          h('pre', null, JSON.stringify(d, null, 1)))
      }))
      out.dataset.state = 'done'
    } catch (error) {
      if (error instanceof Locked) lock(error.message)
      out.replaceChildren(h('p', { class: 'error' }, error.message))
      out.dataset.state = 'error'
    }
  })

  // -- start --------------------------------------------------------------------------------------------
  if (document.body.dataset.locked === '1' && !token) {
    status('locked', false)
    $('token-input').focus()
  } else {
    unlock()
  }
})()
