// Send inference requests to kp-pipeline from Node.js and read their results.
//
//   npm ci && node infer.js <bootstrap> <input topic> <model> [count]
//
// Each request is the Open Inference Protocol's v2 JSON body (the same one KServe and
// Triton take over HTTP), marked by a `content-type: application/json` header, so the
// pipeline reads it on any input topic. It names a reply topic of this process's own in
// `parameters.reply_topic`; the results come back there as v2 JSON response bodies with
// kp-pipeline's fields (status, timings, source offset) under `parameters`. A request the
// pipeline refuses goes to its dead-letter topic instead (with a `kp.id` header naming
// the request); this example only waits for results.
//
// Prints one JSON line per result, then a summary line; exits 1 if any is missing.

const { Kafka, logLevel } = require("kafkajs");

async function main() {
  const [bootstrap, inputTopic, model, countArg] = process.argv.slice(2);
  const count = Number(countArg || 10);
  const kafka = new Kafka({ brokers: [bootstrap], clientId: "node-example", logLevel: logLevel.ERROR });
  const replyTopic = `kp.replies.node.${process.pid}.${Date.now()}`;

  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({ topics: [{ topic: replyTopic, numPartitions: 1 }] });

  const results = new Map();
  const consumer = kafka.consumer({ groupId: `node-example-${process.pid}` });
  await consumer.connect();
  await consumer.subscribe({ topic: replyTopic, fromBeginning: true });
  const done = new Promise((resolve) => {
    consumer.run({
      eachMessage: async ({ message }) => {
        const body = JSON.parse(message.value.toString());
        results.set(body.id, body);
        if (results.size >= count) resolve();
      },
    });
  });

  const producer = kafka.producer();
  await producer.connect();
  const messages = [];
  for (let i = 0; i < count; i++) {
    const x = Array.from({ length: 64 }, (_, k) => Math.sin(i + k / 8));
    const body = {
      id: `node-${i}`,
      model_name: model,
      parameters: { reply_topic: replyTopic },
      inputs: [{ name: "x", datatype: "FP32", shape: [64], data: x }],
    };
    messages.push({
      key: body.id,
      value: JSON.stringify(body),
      headers: { "content-type": "application/json" },
    });
  }
  await producer.send({ topic: inputTopic, messages });

  const timeout = new Promise((resolve) => setTimeout(resolve, 60000));
  await Promise.race([done, timeout]);
  for (const body of results.values()) {
    const scores = body.outputs.find((o) => o.name === "scores");
    console.log(JSON.stringify({ id: body.id, status: body.parameters.status, scores: scores && scores.data }));
  }
  console.log(JSON.stringify({ sent: count, results: results.size, reply_topic: replyTopic }));

  await producer.disconnect();
  await consumer.disconnect();
  await admin.deleteTopics({ topics: [replyTopic] });
  await admin.disconnect();
  process.exit(results.size === count ? 0 : 1);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
