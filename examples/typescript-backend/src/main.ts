// The backend's process: settings from the environment (and a running `loratrain dev`'s
// dev.env), one Temporal client for every request, the HTTP server.
import { ConfigError, loadConfig } from './config.js';
import { log } from './log.js';
import { Runs } from './runs.js';
import { createApp } from './server.js';

async function main(): Promise<void> {
  let config;
  try {
    config = loadConfig();
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`error: ${e.message}\n`);
      process.exit(2);
    }
    throw e;
  }
  let runs: Runs;
  try {
    runs = await Runs.connect(config);
  } catch (e) {
    process.stderr.write(
      `error: cannot reach Temporal at ${config.temporalAddress}: is \`loratrain dev\` running? ` +
        `(${e instanceof Error ? e.message : String(e)})\n`,
    );
    process.exit(1);
  }
  const { server } = createApp(config, runs);
  server.listen(config.port, config.host, () => {
    log('listening', {
      url: `http://${config.host}:${config.port}`,
      temporal: config.temporalAddress,
      namespace: config.namespace,
      task_queue: config.taskQueue,
      webhooks: config.webhookSecret === undefined ? null : '/webhooks/loratrain',
    });
  });
  const stop = () => {
    server.close();
    server.closeAllConnections(); // open event streams would hold the close forever
    void runs.close().finally(() => process.exit(0));
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}

main().catch((e: unknown) => {
  process.stderr.write(`error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
  process.exit(1);
});
