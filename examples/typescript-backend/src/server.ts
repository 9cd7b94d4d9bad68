// The HTTP routes a web app needs around loratrain runs (node:http, no framework):
//
//   POST /uploads                  presigned PUT URLs for a new run's images
//   POST /runs[?run_id=ID]         start a run (body: TrainingRequest JSON)
//   GET  /runs/ID                  the run's status (RunStatus JSON)
//   GET  /runs/ID/events           Server-Sent Events: each new RunStatus until the run is over
//   POST /runs/ID/cancel           cancel the run
//   POST /webhooks/loratrain       the runs' signed webhooks
//   GET  /healthz
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { CodecError } from './codec.js';
import type { Config } from './config.js';
import { RunFeeds } from './feeds.js';
import type { RunStatus } from './generated/run-status.js';
import type { UserWebhookBody } from './generated/user-webhook.js';
import { log } from './log.js';
import {
  NoAnswer,
  RUN_ID,
  RunEnded,
  RunExists,
  RunNotFound,
  Runs,
  isFinal,
  newRunId,
} from './runs.js';
import { uploadProblems, Uploads } from './uploads.js';
import { checkTrainingRequest } from './validation.js';
import { WebhookReceiver } from './webhooks.js';

const MAX_BODY_BYTES = 1024 * 1024;
const SSE_KEEPALIVE_MS = 15_000;
export const WEBHOOK_PATH = '/webhooks/loratrain';

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly extra: Record<string, unknown> = {},
  ) {
    super(message);
  }
}

function send(res: ServerResponse, status: number, body?: unknown): void {
  if (body === undefined) {
    res.writeHead(status).end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
  });
  res.end(text);
}

async function readBody(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY_BYTES) throw new HttpError(413, `the body is over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks);
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  const raw = await readBody(req);
  try {
    return JSON.parse(raw.toString('utf8'));
  } catch {
    throw new HttpError(400, 'the body is not JSON');
  }
}

function runId(value: string | null | undefined): string {
  if (value == null || !RUN_ID.test(value)) {
    throw new HttpError(
      400,
      `${JSON.stringify(value)} is not a valid run id (letters, digits, '.', '_', '-'; at most 128, ` +
        'starting with a letter or digit)',
    );
  }
  return value;
}

/** What a status read's failure means to the caller. */
function readError(e: unknown): never {
  if (e instanceof RunNotFound) throw new HttpError(404, e.message);
  if (e instanceof NoAnswer) throw new HttpError(504, e.message);
  if (e instanceof CodecError) throw new HttpError(502, e.message);
  throw e;
}

export interface App {
  server: Server;
  runs: Runs;
}

export function createApp(
  config: Config,
  runs: Runs,
  onWebhook?: (id: string, body: UserWebhookBody) => void,
): App {
  const uploads = new Uploads(config.s3, config.uploadUrlTtlS);
  const feeds = new RunFeeds(runs);
  const receiver =
    config.webhookSecret === undefined
      ? undefined
      : new WebhookReceiver(config.webhookSecret, (id, body) => {
          // Where a real backend updates its database; this one says what it got.
          log('webhook received', {
            webhook_id: id,
            type: body.type,
            run_id: body.run_id,
            data: body.data,
          });
          onWebhook?.(id, body);
        });

  async function startUploads(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const body = (await readJson(req)) as { files?: unknown; run_id?: unknown } | null;
    const problems = uploadProblems(body?.files, config.maxUploadFiles);
    if (problems.length) throw new HttpError(400, 'cannot upload these files', { problems });
    const id = body?.run_id === undefined ? newRunId() : runId(String(body.run_id));
    const files = await uploads.presign(id, body?.files as string[]);
    send(res, 200, {
      run_id: id,
      images: { bucket: uploads.bucket, prefix: Uploads.prefixFor(id) },
      expires_in_s: config.uploadUrlTtlS,
      uploads: files,
    });
  }

  async function startRun(req: IncomingMessage, res: ServerResponse, url: URL): Promise<void> {
    const id = url.searchParams.has('run_id') ? runId(url.searchParams.get('run_id')) : newRunId();
    const body = await readJson(req);
    if (body !== null && typeof body === 'object' && !Array.isArray(body) && !('webhook' in body)) {
      // Runs report to this backend unless the request names another receiver (or null).
      if (config.publicUrl !== undefined && config.webhookSecret !== undefined) {
        Object.assign(body, {
          webhook: { url: config.publicUrl + WEBHOOK_PATH, secret: config.webhookSecret },
        });
      }
    }
    const checked = checkTrainingRequest(body);
    if (!checked.ok)
      throw new HttpError(400, 'not a valid TrainingRequest', { problems: checked.problems });
    try {
      await runs.start(id, checked.value);
    } catch (e) {
      if (e instanceof RunExists) throw new HttpError(409, e.message, { run_id: id });
      throw e;
    }
    log('run started', { run_id: id });
    send(res, 201, {
      run_id: id,
      status_url: `/runs/${id}`,
      events_url: `/runs/${id}/events`,
      temporal_ui: runs.uiLink(id),
    });
  }

  async function status(res: ServerResponse, id: string): Promise<void> {
    send(res, 200, await runs.status(id).catch(readError));
  }

  async function events(
    req: IncomingMessage,
    res: ServerResponse,
    id: string,
    url: URL,
  ): Promise<void> {
    // EventSource sends Last-Event-ID (our ids are versions) when it reconnects.
    const resumeAt =
      req.headers['last-event-id'] ?? url.searchParams.get('after_version') ?? undefined;
    const seen = resumeAt === undefined || !/^\d+$/.test(String(resumeAt)) ? -1 : Number(resumeAt);
    const current = await runs.status(id).catch(readError); // 404 before any stream starts
    if (isFinal(current) && current.version <= seen) {
      res.writeHead(204).end(); // over, and the client has it all: EventSource stops reconnecting
      return;
    }
    res.writeHead(200, {
      'content-type': 'text/event-stream',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
      'x-accel-buffering': 'no', // nginx: pass events on as they come
    });
    res.write('retry: 3000\n\n');
    const keepalive = setInterval(() => res.write(': keep-alive\n\n'), SSE_KEEPALIVE_MS);
    const event = (name: string, data: unknown, eventId?: number) =>
      res.write(
        `${eventId === undefined ? '' : `id: ${eventId}\n`}event: ${name}\ndata: ${JSON.stringify(data)}\n\n`,
      );
    const stop = feeds.subscribe(id, current, seen, {
      status: (st: RunStatus) => event('status', st, st.version),
      end: (final: RunStatus) => {
        event('end', {
          run_id: final.run_id,
          status: final.status,
          execution_status: final.execution_status,
        });
        clearInterval(keepalive);
        res.end();
      },
      problem: (message: string) => event('problem', { message }),
    });
    // The response's close: the client went away (or the stream ended).
    res.on('close', () => {
      clearInterval(keepalive);
      stop();
    });
  }

  async function cancel(res: ServerResponse, id: string): Promise<void> {
    try {
      await runs.cancel(id);
    } catch (e) {
      if (e instanceof RunNotFound) throw new HttpError(404, e.message);
      if (e instanceof RunEnded)
        throw new HttpError(409, e.message, { execution_status: e.executionStatus });
      throw e;
    }
    log('run cancel requested', { run_id: id });
    send(res, 202, { run_id: id, cancel_requested: true, events_url: `/runs/${id}/events` });
  }

  async function webhook(req: IncomingMessage, res: ServerResponse): Promise<void> {
    if (receiver === undefined)
      throw new HttpError(404, 'no webhook receiver: LORATRAIN_WEBHOOK_SECRET is not set');
    const answer = await receiver.receive(await readBody(req), req.headers);
    if (answer.status >= 400) log('webhook refused', { status: answer.status, ...answer.body });
    send(res, answer.status, answer.body);
  }

  async function route(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://backend');
    const method = req.method ?? 'GET';
    let parts: string[];
    try {
      parts = url.pathname.split('/').filter(Boolean).map(decodeURIComponent);
    } catch {
      throw new HttpError(400, `${url.pathname} is not a valid path`);
    }
    const is = (m: string, ...pattern: (string | null)[]) =>
      method === m &&
      parts.length === pattern.length &&
      pattern.every((p, i) => p === null || p === parts[i]);
    if (is('GET', 'healthz')) return send(res, 200, { ok: true });
    if (is('POST', 'uploads')) return startUploads(req, res);
    if (is('POST', 'runs')) return startRun(req, res, url);
    if (is('GET', 'runs', null)) return status(res, runId(parts[1]));
    if (is('GET', 'runs', null, 'events')) return events(req, res, runId(parts[1]), url);
    if (is('POST', 'runs', null, 'cancel')) return cancel(res, runId(parts[1]));
    if (is('POST', 'webhooks', 'loratrain')) return webhook(req, res);
    throw new HttpError(404, `no route ${method} ${url.pathname}`);
  }

  const server = createServer((req, res) => {
    route(req, res).catch((e: unknown) => {
      if (res.headersSent) {
        res.destroy();
        return;
      }
      if (e instanceof HttpError) return send(res, e.status, { error: e.message, ...e.extra });
      log('request failed', {
        method: req.method,
        url: req.url,
        error: e instanceof Error ? e.message : String(e),
      });
      send(res, 502, {
        error: `loratrain did not answer: ${e instanceof Error ? e.message : String(e)}`,
      });
    });
  });
  return { server, runs };
}
