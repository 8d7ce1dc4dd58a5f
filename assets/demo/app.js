// relay live demo: a dependency-free browser client of relay's WebSocket protocol
// (docs/protocol.md). It keeps, per channel, the last offset it has seen, so after any disconnect
// it resubscribes with `since` and the server replays exactly what was missed.
//
// The page's Content-Security-Policy enforces Trusted Types, so this script builds the DOM with
// createElement/textContent only; message data is never parsed as HTML.
'use strict';

(() => {
  /** Channel names relay accepts (docs/protocol.md, "Channels"). */
  const CHANNEL_RE = /^[A-Za-z0-9_\-:.]{1,128}$/;
  /** Reconnect backoff: doubles from MIN to MAX, each delay jittered so that many pages
   *  reconnecting after a deploy do not arrive at the same instant. */
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 8000;
  /** After an `unavailable` error (Redis or Postgres briefly down) pending subscriptions are
   *  retried this much later. */
  const RESUBSCRIBE_DELAY_MS = 2000;
  /** Oldest log entries are dropped beyond this, so a busy channel cannot grow the page forever. */
  const LOG_LIMIT = 500;

  const CLOSE_REASONS = {
    1000: 'closed',
    1001: 'server going away',
    1006: 'connection lost',
    1008: 'too many invalid frames',
    1009: 'message too large',
    4000: 'idle timeout',
    4001: 'authentication failed',
    4003: 'token expired',
    4008: 'client too slow',
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $('status'),
    statusText: $('status-text'),
    retryNow: $('retry-now'),
    subscribeForm: $('subscribe-form'),
    subscribeChannel: $('subscribe-channel'),
    subscribeError: $('subscribe-error'),
    channels: $('channels'),
    channelsEmpty: $('channels-empty'),
    channelOptions: $('channel-options'),
    publishForm: $('publish-form'),
    publishChannel: $('publish-channel'),
    publishChannelError: $('publish-channel-error'),
    publishData: $('publish-data'),
    publishDataError: $('publish-data-error'),
    publishButton: $('publish-button'),
    publishResult: $('publish-result'),
    log: $('log'),
    logEmpty: $('log-empty'),
    clearLog: $('clear-log'),
  };

  /**
   * Subscriptions the user wants, by channel name:
   *   cursor      offset after which delivery continues (the last id seen, or the `last_id` of
   *               the first `subscribed`); null until the server has told us a position
   *   state       'pending' | 'resuming' | 'live' | 'offline'
   *   replayUntil while a `since` replay runs: the last replayed offset, else null
   */
  const channels = new Map();

  let socket = null;
  let attempt = 0; // failed connection attempts since the last successful open
  let connectedOnce = false;
  let retryTimer = null;
  let resubscribeTimer = null;

  // ---- connection -------------------------------------------------------------------------

  /** Query parameters of every connection. The token is not among them: it goes in the first
   *  frame, so it never appears in a URL (or a log line). */
  function connectionParams() {
    return new URLSearchParams();
  }

  // ---- authentication -----------------------------------------------------------------------
  // With auth on, relay's local config serves GET /demo/token (a short-lived HS256 token); the
  // route does not exist otherwise (404), and the page then connects without a token.

  let token = null;
  let tokenExp = 0; // seconds since the epoch

  /** A token valid for at least another minute, or null when the server hands out none. */
  async function currentToken(force) {
    const now = Date.now() / 1000;
    if (!force && token && tokenExp - now > 60) return token;
    try {
      const res = await fetch('/demo/token', { cache: 'no-store' });
      if (!res.ok) {
        token = null;
        return null;
      }
      const body = await res.json();
      token = body.token;
      tokenExp = body.exp;
    } catch (err) {
      token = null;
    }
    return token;
  }

  function authHeaders() {
    return token ? { authorization: `Bearer ${token}` } : {};
  }

  function socketUrl() {
    const url = new URL('/ws', window.location.href);
    url.protocol = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.search = connectionParams().toString();
    return url.toString();
  }

  async function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    ui.retryNow.hidden = true;
    setStatus('connecting', connectedOnce ? 'Reconnecting…' : 'Connecting…');
    const handshakeToken = await currentToken(false);

    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (err) {
      scheduleReconnect(`cannot open a WebSocket: ${err.message}`);
      return;
    }
    socket = ws;
    let opened = false;

    ws.addEventListener('open', () => {
      opened = true;
      attempt = 0;
      const again = connectedOnce;
      connectedOnce = true;
      setStatus('connected', 'Connected');
      if (again) note('info', 'Reconnected.');
      // The handshake frame comes first; relay handles frames in order, so the subscribes
      // after it are checked against this token.
      if (handshakeToken) ws.send(JSON.stringify({ type: 'auth', token: handshakeToken }));
      for (const [name, ch] of channels) sendSubscribe(name, ch);
    });

    ws.addEventListener('message', (event) => {
      if (typeof event.data === 'string') handleFrame(event.data);
    });

    // `error` is always followed by `close`, which does the work.
    ws.addEventListener('close', (event) => {
      if (socket !== ws) return;
      socket = null;
      for (const ch of channels.values()) {
        ch.state = 'offline';
        ch.replayUntil = null;
      }
      renderChannels();
      // A refused or expired token: fetch a fresh one for the next attempt.
      if (event.code === 4001 || event.code === 4003) token = null;
      const reason = CLOSE_REASONS[event.code] || `code ${event.code}`;
      if (opened) note('warning', `Disconnected (${reason}). Reconnecting and resuming…`);
      scheduleReconnect(reason);
    });
  }

  function scheduleReconnect(reason) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    attempt += 1;
    const seconds = (delay / 1000).toFixed(1);
    setStatus('offline', `Offline (${reason}) · retrying in ${seconds} s`);
    ui.retryNow.hidden = false;
    retryTimer = setTimeout(connect, delay);
  }

  function isOpen() {
    return socket !== null && socket.readyState === WebSocket.OPEN;
  }

  function send(frame) {
    if (!isOpen()) return false;
    socket.send(JSON.stringify(frame));
    return true;
  }

  function sendSubscribe(name, ch) {
    const frame = { type: 'subscribe', channel: name };
    if (ch.cursor !== null) frame.since = ch.cursor;
    ch.state = ch.cursor !== null ? 'resuming' : 'pending';
    ch.requestedSince = ch.cursor;
    send(frame);
    renderChannels();
  }

  // ---- server frames ----------------------------------------------------------------------

  function handleFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      note('error', 'The server sent a frame that is not JSON.');
      return;
    }
    switch (frame.type) {
      case 'subscribed':
        onSubscribed(frame);
        break;
      case 'message':
        onMessage(frame);
        break;
      case 'gap':
        onGap(frame);
        break;
      case 'error':
        onError(frame);
        break;
      case 'token_expiring':
        // Answer with a fresh token before `exp`, or relay closes the connection (4003).
        currentToken(true).then((fresh) => {
          if (fresh) send({ type: 'refresh', token: fresh });
        });
        break;
      default:
        // `unsubscribed`, `pong`, and frame types added later need nothing from the page.
        break;
    }
  }

  function onSubscribed(frame) {
    const ch = channels.get(frame.channel);
    if (!ch) return; // unsubscribed meanwhile
    const since = ch.requestedSince;
    const last = frame.last_id;
    if (frame.recovered === true) {
      // Offsets (since, last] are replayed right after this frame, then live ones follow.
      ch.replayUntil = last > since ? last : null;
      const missed = last - since;
      note(
        'recovered',
        missed > 0
          ? `${frame.channel}: resumed after #${since}; recovered ${plural(missed, 'missed message')} (#${since + 1}–#${last}). Nothing was lost.`
          : `${frame.channel}: resumed after #${since}; nothing was published meanwhile.`,
        frame.channel,
      );
    } else if (frame.recovered === false) {
      // History no longer reaches back to `since` (or the channel was reset): what is still
      // stored follows from `oldest_id`.
      const oldest = frame.oldest_id;
      ch.replayUntil = last >= oldest ? last : null;
      ch.cursor = oldest - 1;
      note(
        'gap',
        oldest > since + 1
          ? `${frame.channel}: messages #${since + 1}–#${oldest - 1} are no longer stored and were missed; replaying from #${oldest}.`
          : `${frame.channel}: the channel's history was reset; showing what is stored.`,
        frame.channel,
      );
    } else if (ch.cursor === null) {
      // A fresh subscription: everything after `last_id` will be delivered.
      ch.cursor = last;
    }
    ch.state = 'live';
    renderChannels();
  }

  function onMessage(frame) {
    const ch = channels.get(frame.channel);
    if (!ch) return; // sent before our unsubscribe reached the server
    const id = typeof frame.id === 'number' ? frame.id : null;
    let recovered = false;
    if (id !== null) {
      recovered = ch.replayUntil !== null && id <= ch.replayUntil;
      if (ch.replayUntil !== null && id >= ch.replayUntil) ch.replayUntil = null;
      ch.cursor = id;
      renderChannels();
    }
    appendMessage(frame.channel, id, frame.data, recovered);
  }

  function onGap(frame) {
    const ch = channels.get(frame.channel);
    if (!ch) return;
    // Offsets from..to are gone (pruned, or history unavailable): never resume before them.
    ch.cursor = frame.to;
    if (ch.replayUntil !== null && frame.to >= ch.replayUntil) ch.replayUntil = null;
    note(
      'gap',
      `${frame.channel}: messages #${frame.from}–#${frame.to} could not be recovered and were missed.`,
      frame.channel,
    );
    renderChannels();
  }

  function onError(frame) {
    note('error', `Server: ${frame.message || 'error'} (${frame.code}).`);
    if (frame.code === 'unavailable') {
      // A subscribe refused during a Redis outage: ask again shortly.
      clearTimeout(resubscribeTimer);
      resubscribeTimer = setTimeout(() => {
        for (const [name, ch] of channels) {
          if (ch.state === 'pending' || ch.state === 'resuming') sendSubscribe(name, ch);
        }
      }, RESUBSCRIBE_DELAY_MS);
    }
  }

  // ---- user actions -----------------------------------------------------------------------

  function subscribe(name) {
    if (channels.has(name)) return `Already subscribed to “${name}”.`;
    const ch = { cursor: null, state: 'pending', replayUntil: null, requestedSince: null };
    channels.set(name, ch);
    if (isOpen()) sendSubscribe(name, ch);
    else ch.state = 'offline';
    if (!ui.publishChannel.value) ui.publishChannel.value = name;
    renderChannels();
    return null;
  }

  function unsubscribe(name) {
    channels.delete(name);
    send({ type: 'unsubscribe', channel: name });
    renderChannels();
    ui.subscribeChannel.focus();
  }

  async function publish(channel, data) {
    // The HTTP API answers only after the message is committed, with its offset.
    const url = `/api/v1/channels/${encodeURIComponent(channel)}/messages`;
    const res = await fetch(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...authHeaders() },
      body: JSON.stringify({ data }),
    });
    const body = await res.json().catch(() => null);
    if (res.status !== 201) {
      const message = body && body.error ? body.error.message : `HTTP ${res.status}`;
      throw new Error(message);
    }
    return body;
  }

  ui.subscribeForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = ui.subscribeChannel.value.trim();
    const problem = channelProblem(name) || subscribe(name);
    showFieldError(ui.subscribeChannel, ui.subscribeError, problem);
    if (!problem) ui.subscribeChannel.value = '';
  });

  ui.publishForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    ui.publishResult.textContent = '';
    const channel = ui.publishChannel.value.trim();
    const channelError = channelProblem(channel);
    showFieldError(ui.publishChannel, ui.publishChannelError, channelError);
    let data;
    let dataError = null;
    try {
      data = JSON.parse(ui.publishData.value);
    } catch (err) {
      dataError = `Not valid JSON: ${err.message}`;
    }
    showFieldError(ui.publishData, ui.publishDataError, dataError);
    if (channelError) {
      ui.publishChannel.focus();
      return;
    }
    if (dataError) {
      ui.publishData.focus();
      return;
    }
    ui.publishButton.disabled = true;
    ui.publishResult.dataset.kind = 'pending';
    ui.publishResult.textContent = 'Publishing…';
    try {
      const ack = await publish(channel, data);
      ui.publishResult.dataset.kind = 'ok';
      ui.publishResult.textContent = `Published #${ack.id} to ${ack.channel}`;
    } catch (err) {
      ui.publishResult.dataset.kind = 'error';
      ui.publishResult.textContent = `Not published: ${err.message}`;
    } finally {
      ui.publishButton.disabled = false;
    }
  });

  ui.publishData.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      ui.publishForm.requestSubmit();
    }
  });
  // A corrected field loses its error as soon as the user types.
  for (const [field, error] of [
    [ui.subscribeChannel, ui.subscribeError],
    [ui.publishChannel, ui.publishChannelError],
    [ui.publishData, ui.publishDataError],
  ]) {
    field.addEventListener('input', () => showFieldError(field, error, null));
  }

  ui.retryNow.addEventListener('click', () => {
    if (retryTimer !== null) connect();
  });
  window.addEventListener('online', () => {
    if (retryTimer !== null) connect();
  });

  ui.clearLog.addEventListener('click', () => {
    ui.log.replaceChildren();
    ui.logEmpty.hidden = false;
  });

  // ---- rendering --------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? '' : 's'}`;
  }

  function channelProblem(name) {
    if (!name) return 'Enter a channel name.';
    if (!CHANNEL_RE.test(name)) {
      return 'Use 1–128 letters, digits or _ - : . (no spaces).';
    }
    return null;
  }

  function showFieldError(field, errorNode, message) {
    errorNode.hidden = !message;
    errorNode.textContent = message || '';
    if (message) field.setAttribute('aria-invalid', 'true');
    else field.removeAttribute('aria-invalid');
  }

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.statusText.textContent = text;
  }

  const STATE_LABELS = {
    pending: 'subscribing…',
    resuming: 'resuming…',
    live: 'live',
    offline: 'waiting',
  };

  function renderChannels() {
    const items = [];
    const options = [];
    for (const [name, ch] of channels) {
      const li = el('li', 'channel');
      li.dataset.channel = name;
      li.dataset.state = ch.state;
      if (ch.cursor !== null) li.dataset.cursor = String(ch.cursor);

      const info = el('div', 'channel-info');
      info.append(el('span', 'channel-name', name));
      const meta = el('span', 'channel-meta');
      meta.append(el('span', 'badge badge-' + ch.state, STATE_LABELS[ch.state]));
      if (ch.cursor !== null) meta.append(el('span', 'channel-cursor', `last #${ch.cursor}`));
      info.append(meta);

      const remove = el('button', 'button-ghost button-small', 'Unsubscribe');
      remove.type = 'button';
      remove.setAttribute('aria-label', `Unsubscribe from ${name}`);
      remove.addEventListener('click', () => unsubscribe(name));

      li.append(info, remove);
      items.push(li);

      const option = document.createElement('option');
      option.value = name;
      options.push(option);
    }
    ui.channels.replaceChildren(...items);
    ui.channelOptions.replaceChildren(...options);
    ui.channelsEmpty.hidden = items.length > 0;
  }

  function appendEntry(li) {
    const log = ui.log;
    // Follow new entries only if the reader is already at the bottom; never yank them away
    // from something they scrolled up to read.
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 48;
    log.append(li);
    while (log.childElementCount > LOG_LIMIT) log.firstElementChild.remove();
    ui.logEmpty.hidden = true;
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function timeElement() {
    const now = new Date();
    const time = el('time', 'entry-time', now.toLocaleTimeString([], { hour12: false }));
    time.dateTime = now.toISOString();
    time.title = 'received at';
    return time;
  }

  function appendMessage(channel, id, data, recovered) {
    const li = el('li', 'entry message');
    li.dataset.channel = channel;
    li.dataset.id = id === null ? '' : String(id);
    li.dataset.recovered = String(recovered);

    const meta = el('div', 'entry-meta');
    meta.append(el('span', 'entry-channel', channel));
    meta.append(el('span', 'entry-id', id === null ? 'no id' : `#${id}`));
    if (recovered) meta.append(el('span', 'badge badge-recovered', 'recovered'));

    li.append(meta, el('pre', 'entry-data', formatData(data)), timeElement());
    appendEntry(li);
  }

  function formatData(data) {
    const text = JSON.stringify(data);
    // Short values stay on one line; larger objects are easier to read indented.
    return text.length > 80 ? JSON.stringify(data, null, 2) : text;
  }

  const NOTE_ICONS = { info: '●', warning: '!', recovered: '✓', gap: '!', error: '×' };

  function note(kind, text, channel) {
    const li = el('li', `entry note note-${kind}`);
    li.dataset.kind = kind;
    if (channel) li.dataset.channel = channel;
    const icon = el('span', 'note-icon', NOTE_ICONS[kind] || '●');
    icon.setAttribute('aria-hidden', 'true');
    li.append(icon, el('span', 'note-text', text), timeElement());
    appendEntry(li);
  }

  renderChannels();
  connect();
})();
