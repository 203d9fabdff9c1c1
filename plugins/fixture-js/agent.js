// Test fixture in JavaScript: one capability per way an agent can misbehave,
// for the cross-language conformance suite.
//   test.echo   returns the payload (for per-task cost measurements)
//   test.spin   loops forever
//   test.hog    allocates 1 MiB blocks: N of them for payload "N", else until it fails
//   test.throw  throws an Error whose message is the payload (an uncaught exception)
//   test.fail   returns the `failed` task-error with the payload as message
//   test.recurse recurses without end (the engine's stack limit stops it)

export function describe() {
  const cap = (name, description) => ({ name, version: '1.0.0', description });
  return {
    name: 'fixture-js',
    version: '0.1.0',
    capabilities: [
      cap('test.echo', 'returns the payload'),
      cap('test.spin', 'loops forever'),
      cap('test.hog', 'allocates memory'),
      cap('test.throw', 'throws an exception'),
      cap('test.fail', 'returns a failed task-error'),
      cap('test.recurse', 'recurses without end'),
    ],
  };
}

export function handle(task) {
  const text = new TextDecoder().decode(task.payload);
  switch (task.capability) {
    case 'test.echo':
      return task.payload;
    case 'test.spin': {
      let x = task.payload.length;
      for (;;) { x = (x * 1103515245 + 12345) | 0; }
    }
    case 'test.hog': {
      const limit = /^\d+$/.test(text) ? Number(text) : Infinity;
      const blocks = [];
      while (blocks.length < limit) {
        const block = new Uint8Array(1 << 20);
        block[block.length - 1] = 1;
        blocks.push(block);
      }
      return new TextEncoder().encode(String(blocks.length));
    }
    case 'test.throw':
      throw new Error(text);
    case 'test.fail':
      throw { tag: 'failed', val: text };
    case 'test.recurse': {
      const down = (n) => down(n + 1) + 1;
      return new TextEncoder().encode(String(down(0)));
    }
    default:
      throw { tag: 'invalid-input', val: `unknown capability ${task.capability}` };
  }
}
