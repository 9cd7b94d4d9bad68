// The receiver of a run's user webhooks: Standard Webhooks signed with the `whsec_` secret the
// run was started with (TrainingRequest.webhook.secret; activities/notify.py signs them).
import type { IncomingHttpHeaders } from 'node:http';
import { Webhook } from 'standardwebhooks';
import type { UserWebhookBody } from './generated/user-webhook.js';
import { userWebhookSchema } from './generated/json-schemas.js';
import { checkUserWebhook } from './validation.js';

/** Event types the schema knows; another (newer) type is accepted and ignored, never refused. */
const KNOWN_TYPES = new Set(
  Object.keys((userWebhookSchema.discriminator as { mapping: Record<string, string> }).mapping),
);
/** Webhook ids remembered to answer a redelivery as a duplicate (the worker retries for a day). */
const REMEMBERED_IDS = 10_000;

export interface Answer {
  status: number;
  body?: Record<string, unknown>;
}

export type WebhookHandler = (id: string, body: UserWebhookBody) => void | Promise<void>;

export class WebhookReceiver {
  private readonly webhook: Webhook;
  private readonly seen = new Set<string>();

  constructor(
    secret: string,
    private readonly handle: WebhookHandler,
  ) {
    this.webhook = new Webhook(secret);
  }

  /** Verifies the raw body before reading it: 401 unsigned or tampered, 400 not a webhook body. */
  async receive(raw: Buffer, headers: IncomingHttpHeaders): Promise<Answer> {
    const signed: Record<string, string> = {};
    for (const name of ['webhook-id', 'webhook-timestamp', 'webhook-signature']) {
      const value = headers[name];
      signed[name] = (Array.isArray(value) ? value[0] : value) ?? '';
    }
    try {
      this.webhook.verify(raw, signed, { jsonParse: false });
    } catch (e) {
      // Missing, malformed, expired or not matching: all the same to the sender.
      return {
        status: 401,
        body: { error: `signature refused: ${e instanceof Error ? e.message : e}` },
      };
    }
    const id = signed['webhook-id'] as string;
    let body: unknown;
    try {
      body = JSON.parse(raw.toString('utf8'));
    } catch {
      return { status: 400, body: { error: 'the body is not JSON' } };
    }
    const type = (body as { type?: unknown } | null)?.type;
    if (typeof type !== 'string' || !KNOWN_TYPES.has(type)) {
      return {
        status: 202,
        body: { ignored: `event type ${JSON.stringify(type)} is not one this receiver knows` },
      };
    }
    const checked = checkUserWebhook(body);
    if (!checked.ok)
      return {
        status: 400,
        body: { error: 'not a loratrain webhook body', problems: checked.problems },
      };
    // The webhook-id is the same on every retry of one event: handle each event once.
    if (this.seen.has(id)) return { status: 200, body: { duplicate: id } };
    await this.handle(id, checked.value);
    this.seen.add(id);
    if (this.seen.size > REMEMBERED_IDS)
      this.seen.delete(this.seen.values().next().value as string);
    return { status: 204 };
  }
}
