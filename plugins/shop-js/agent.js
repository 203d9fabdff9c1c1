// The shop of the order workflow example (plugins/workflows/order.toml), in
// JavaScript: stock, reservations, charges and shipments in kv. Every
// operation is keyed by the order id and does nothing the second time, so
// a step that runs again after a crash does not apply its effect twice.
// Inputs and results are JSON.
import { get, set, delete as remove } from 'orch:agent/kv@0.1.0';

const enc = new TextEncoder();
const dec = new TextDecoder();
// Stock of a SKU never seen before.
const INITIAL_STOCK = 100;

function read(key) {
  const v = get(key);
  return v ? JSON.parse(dec.decode(v)) : null;
}

function write(key, value) {
  set(key, enc.encode(JSON.stringify(value)));
}

function stock(sku) {
  const s = read(`stock/${sku}`);
  return s === null ? INITIAL_STOCK : s;
}

function fail(tag, message) {
  // Throwing { tag, val } returns that task-error variant to the host.
  throw { tag, val: message };
}

function need(order, field) {
  if (order[field] === undefined || order[field] === null) {
    fail('invalid-input', `the order has no ${field}`);
  }
  return order[field];
}

const handlers = {
  // {"id", "sku", "count"} -> {"reservation", "sku", "count", "stock"}
  'shop.reserve': (order) => {
    const id = need(order, 'id');
    const sku = need(order, 'sku');
    const count = Number(need(order, 'count'));
    const key = `reservation/${id}`;
    const done = read(key);
    if (done) return { reservation: id, sku, count: done.count, stock: stock(sku) };
    const left = stock(sku);
    if (count > left) fail('failed', `only ${left} of ${sku} in stock, ${count} asked`);
    write(`stock/${sku}`, left - count);
    write(key, { sku, count });
    return { reservation: id, sku, count, stock: left - count };
  },
  // The compensation of reserve: {"input": order, "result": ...}.
  'shop.release': (undo) => {
    const id = need(undo.input, 'id');
    const r = read(`reservation/${id}`);
    if (!r) return { released: 0 };
    write(`stock/${r.sku}`, stock(r.sku) + r.count);
    remove(`reservation/${id}`);
    return { released: r.count, sku: r.sku, stock: stock(r.sku) };
  },
  // {"id", "amount", "card"} -> {"charged"}; the card "declined" fails.
  'shop.charge': (order) => {
    const id = need(order, 'id');
    const amount = Number(need(order, 'amount'));
    if (order.card === 'declined') fail('failed', `card declined for order ${id}`);
    if (!read(`charge/${id}`)) {
      write(`charge/${id}`, amount);
      write('revenue', (read('revenue') || 0) + amount);
    }
    return { charged: amount, revenue: read('revenue') };
  },
  'shop.refund': (undo) => {
    const id = need(undo.input, 'id');
    const amount = read(`charge/${id}`);
    if (amount === null) return { refunded: 0 };
    write('revenue', (read('revenue') || 0) - amount);
    remove(`charge/${id}`);
    return { refunded: amount, revenue: read('revenue') };
  },
  // {"id", "address"} -> {"tracking"}; an address "nowhere" fails.
  'shop.ship': (order) => {
    const id = need(order, 'id');
    if (order.address === 'nowhere') fail('failed', `cannot ship order ${id} to nowhere`);
    write(`shipment/${id}`, order.address);
    return { tracking: `TRK-${id}` };
  },
  // "SKU" -> {"sku", "stock", "revenue"}: what the shop holds now.
  'shop.stock': (sku) => ({ sku, stock: stock(sku), revenue: read('revenue') || 0 }),
};

export function describe() {
  const capability = (name, description) => ({ name, version: '1.0.0', description });
  return {
    name: 'shop-js',
    version: '0.1.0',
    capabilities: [
      capability('shop.reserve', 'reserves stock for an order: {"id","sku","count"}'),
      capability('shop.release', 'releases an order\'s reservation (compensation of shop.reserve)'),
      capability('shop.charge', 'charges an order: {"id","amount","card"}; the card "declined" fails'),
      capability('shop.refund', 'refunds an order\'s charge (compensation of shop.charge)'),
      capability('shop.ship', 'ships an order: {"id","address"}'),
      capability('shop.stock', 'shows the stock of a SKU and the revenue'),
    ],
  };
}

export function handle(task) {
  const handler = handlers[task.capability];
  if (!handler) fail('invalid-input', `shop-js does not serve ${task.capability}`);
  let input;
  const text = dec.decode(task.payload);
  try {
    input = task.capability === 'shop.stock' ? text : JSON.parse(text);
  } catch (e) {
    fail('invalid-input', `the input is not JSON: ${e.message}`);
  }
  let out;
  try {
    out = handler(input);
  } catch (e) {
    if (e && e.tag) throw e;
    // A kv failure (set/delete throw their error payload).
    fail('retryable', `kv: ${e && e.payload !== undefined ? e.payload : e}`);
  }
  return enc.encode(JSON.stringify(out));
}
