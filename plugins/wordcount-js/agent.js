// wordcount in JavaScript (componentize-js): counts words, lines and bytes of
// UTF-8 text with exactly the Rust wordcount's output, and counts its calls
// in kv.
import { log } from 'orch:agent/log@0.1.0';
import { get, set } from 'orch:agent/kv@0.1.0';

// Unicode White_Space, the set Rust's split_whitespace uses. JavaScript's \s
// differs (it has U+FEFF and lacks U+0085), so the class is spelled out. The
// split runs in the engine's regex code: a per-character loop in JS costs
// thousands of fuel per character in an interpreter running inside wasm.
const WHITE_SPACE = /[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/u;

export function describe() {
  return {
    name: 'wordcount-js',
    version: '0.1.0',
    capabilities: [{
      name: 'text.wordcount',
      version: '1.0.0',
      description: 'counts words, lines and bytes of UTF-8 text; returns JSON {"words":N,"lines":N,"bytes":N}',
    }],
  };
}

function countCall() {
  const previous = get('calls');
  const n = previous ? Number(new TextDecoder().decode(previous)) + 1 : 1;
  // kv.set returns result<_, string>: an err is thrown as an exception.
  set('calls', new TextEncoder().encode(String(n)));
  log('debug', `wordcount-js call ${n}`);
}

export function handle(task) {
  let text;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(task.payload);
  } catch (e) {
    // Throwing { tag, val } returns that task-error variant to the host.
    throw { tag: 'invalid-input', val: 'payload is not UTF-8' };
  }
  const words = text.split(WHITE_SPACE).filter((w) => w.length > 0).length;
  const lines = text.split('\n').length - 1;
  try {
    countCall();
  } catch (e) {
    throw { tag: 'retryable', val: `kv: ${e.payload ?? e}` };
  }
  const out = `{"words":${words},"lines":${lines},"bytes":${task.payload.length}}`;
  return new TextEncoder().encode(out);
}
