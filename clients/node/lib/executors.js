'use strict';
// The CLI agent's built-in task kinds: small stand-ins that show the contract, not real work.

function sleepFor(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}

function permanent(message) {
  const err = new Error(message);
  err.retryable = false; // straight to DEAD_LETTER: asking again gives the same answer
  return err;
}

const EXECUTORS = {
  /** The payload, unchanged. */
  echo: async (task) => task.spec.payload,
  /** The payload as UTF-8 text, upper-cased; a payload that is not UTF-8 fails for good. */
  upper: async (task) => {
    let text;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(task.spec.payload);
    } catch (err) {
      throw permanent('upper needs a UTF-8 payload');
    }
    return text.toUpperCase();
  },
  /** Sleeps {"ms": N} (default 100), then returns "slept N ms"; a cancel stops it. */
  sleep: async (task, { signal, progress }) => {
    let ms = 100;
    if (task.spec.payload.length) {
      try {
        ms = Number(JSON.parse(task.spec.payload.toString('utf8')).ms ?? 100);
      } catch (err) {
        throw permanent('sleep needs a JSON payload like {"ms": 100}');
      }
    }
    progress(0, 'sleeping');
    await sleepFor(ms, signal);
    return `slept ${ms} ms`;
  },
  /** Always fails, retryably (the coordinator retries, then DEAD_LETTER). */
  fail: async () => {
    throw new Error('the fail kind always fails');
  },
};

/** One handler that dispatches on task.spec.kind among `kinds`. */
function handlerFor(kinds) {
  const unknown = kinds.filter((k) => !EXECUTORS[k]);
  if (unknown.length) {
    throw new Error(`no built-in executor for ${unknown.join(', ')}; use ${Object.keys(EXECUTORS).join(', ')}`);
  }
  return (task, ctx) => {
    const run = EXECUTORS[task.spec.kind];
    if (!run || !kinds.includes(task.spec.kind)) throw new Error(`this agent does not run kind ${task.spec.kind}`);
    return run(task, ctx);
  };
}

module.exports = { EXECUTORS, handlerFor };
