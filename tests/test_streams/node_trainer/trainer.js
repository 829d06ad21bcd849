// A trainer in Node.js, written from the event contract alone (docs/non-python-trainers.md;
// schemas/jsonschema/): kafkajs with its defaults (no codec plugin), JSON
// values, the run id as key, kafkajs's default partitioner (Java's murmur2).
//
// It announces its run, reports a step's metrics (a simulated, slowly falling loss), saves a
// checkpoint every INTERVAL steps (kept in memory), diverges once at SPIKE_STEP, applies the
// worker's commands between steps and acknowledges each on trainer.acks. A rollback restores
// the checkpoint and continues after its step under the next attempt. It also reads its
// reward statistics. It stops AFTER steps past the restored one and prints one JSON line:
// what it received and what it did.
'use strict';

const { Kafka, Partitioners, logLevel } = require('kafkajs');

const env = (name, fallback) => process.env[name] ?? fallback;
const BOOTSTRAP = env('BOOTSTRAP').split(',');
const PREFIX = env('TOPIC_PREFIX', '');
const RUN_ID = env('RUN_ID', 'node-run');
const INTERVAL = Number(env('INTERVAL', '50'));
const SPIKE_STEP = Number(env('SPIKE_STEP', '130'));
const AFTER = Number(env('AFTER', '100'));
const DEADLINE = Date.now() + 1000 * Number(env('TIMEOUT_S', '90'));

const topic = (name) => `${PREFIX}${name}`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => Date.now() / 1000;

async function main() {
  const kafka = new Kafka({ clientId: RUN_ID, brokers: BOOTSTRAP, logLevel: logLevel.WARN });
  const producer = kafka.producer({ createPartitioner: Partitioners.DefaultPartitioner });
  const consumer = kafka.consumer({ groupId: `${RUN_ID}-commands` });
  await producer.connect();
  await consumer.connect();
  const send = (name, value) =>
    producer.send({
      topic: topic(name),
      acks: -1,
      messages: [{ key: RUN_ID, value: JSON.stringify(value) }],
    });

  const run = { step: 0, attempt: 0, weights: 1.0, lastCheckpoint: null, spiked: false };
  const checkpoints = new Map(); // step -> saved state
  const received = []; // every command of this run, in order
  const handled = new Set(); // command ids already applied: each is applied once
  const pending = []; // commands read, applied between steps (in the training loop)

  let rewardStats = null; // the newest window statistics of this run
  let rewardStatsRead = 0;
  await consumer.subscribe({
    topics: [topic('trainer.commands'), topic('trainer.reward-stats')],
    fromBeginning: true,
  });
  await consumer.run({
    eachMessage: async ({ topic: from, message }) => {
      if (message.key === null || message.key.toString() !== RUN_ID) return; // another run
      const value = JSON.parse(message.value.toString());
      if (from === topic('trainer.reward-stats')) {
        rewardStats = value;
        rewardStatsRead += 1;
        return;
      }
      received.push(value);
      pending.push(value);
    },
  });

  async function ack(command, status, detail, after) {
    await send('trainer.acks', {
      command_id: command.command_id,
      run_id: RUN_ID,
      status,
      detail,
      ts: now(),
      after,
      command_type: command.type,
    });
  }

  async function apply(command) {
    if (handled.has(command.command_id)) return; // a redelivery: applied already
    handled.add(command.command_id);
    if (command.type === 'rollback') {
      const saved = checkpoints.get(command.checkpoint_step);
      if (saved === undefined) {
        await ack(command, 'rejected', `no checkpoint at step ${command.checkpoint_step}`);
        return;
      }
      run.weights = saved.weights;
      run.lastCheckpoint = command.checkpoint_step;
      run.attempt += 1;
      run.step = command.checkpoint_step + 1;
      await ack(command, 'applied', 'restored', { step: command.checkpoint_step, attempt: run.attempt });
    } else if (command.type === 'prune_checkpoints') {
      for (const step of command.steps) checkpoints.delete(step);
      await ack(command, 'applied', `pruned ${command.steps.length}`);
    } else if (command.type === 'set_entropy_coef') {
      run.entropyCoef = command.entropy_coef;
      await ack(command, 'applied', 'set', { entropy_coef: command.entropy_coef });
    } else {
      await ack(command, 'rejected', `not supported by this trainer: ${command.type}`);
    }
  }

  await send('trainer.runs', {
    run_id: RUN_ID,
    ts: now(),
    settings: { 'checkpoints.interval_steps': INTERVAL, 'checkpoints.health_lookback_steps': 20 },
    algorithm: 'node-sim',
  });

  let restoredAt = null;
  while (Date.now() < DEADLINE) {
    const step = run.step;
    if (step > 0 && step % INTERVAL === 0) {
      checkpoints.set(step, { weights: run.weights });
      run.lastCheckpoint = step;
      await send('trainer.checkpoints', {
        run_id: RUN_ID,
        step,
        uri: `memory://${RUN_ID}/${step}`,
        ts: now(),
        attempt: run.attempt,
      });
    }
    const spike = step === SPIKE_STEP && !run.spiked;
    run.spiked = run.spiked || spike;
    run.weights *= 0.999; // the "update"
    const loss = run.weights + (spike ? 50 : 0);
    const metric = { run_id: RUN_ID, step, loss, reward: 1 / (1 + loss), ts: now(), attempt: run.attempt };
    if (run.lastCheckpoint !== null) metric.checkpoint_step = run.lastCheckpoint;
    await send('trainer.metrics', metric);
    run.step = step + 1;
    while (pending.length > 0) {
      const command = pending.shift();
      const before = run.attempt;
      await apply(command);
      if (run.attempt !== before) restoredAt = run.step - 1;
    }
    if (restoredAt !== null && run.step > restoredAt + AFTER) break;
    if (step >= SPIKE_STEP) await sleep(10); // let the worker's answer catch up
  }
  await sleep(1000); // a second rollback would arrive now
  while (pending.length > 0) await apply(pending.shift());
  const report = { received, restoredAt, attempt: run.attempt, step: run.step };
  console.log(JSON.stringify({ ...report, rewardStats, rewardStatsRead }));
  await consumer.disconnect();
  await producer.disconnect();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
