// Training runs through Temporal: start, read, wait for a change, cancel. The conventions are
// the Python client's (client/runs.py): workflow type TrainingWorkflow, workflow id = run id,
// one run per id ever, the worker's task queue, payloads through the codec.
import {
  Client,
  Connection,
  WorkflowNotFoundError,
  type WorkflowExecutionDescription,
} from '@temporalio/client';
import {
  DefaultFailureConverter,
  SearchAttributeType,
  defaultPayloadConverter,
  type DataConverter,
  type LoadedDataConverter,
  WorkflowExecutionAlreadyStartedError,
  defineSearchAttributeKey,
} from '@temporalio/common';
import { randomBytes } from 'node:crypto';
import { AesGcmCodec, CodecError } from './codec.js';
import type { Config } from './config.js';
import { runStatusSchema } from './generated/json-schemas.js';
import type { RunStatus, RunStatusName } from './generated/run-status.js';
import type { TrainingRequest } from './generated/training-request.js';

export const WORKFLOW_TYPE = 'TrainingWorkflow';
/** DESIGN.md's order; a run may leave it for stalled, failed or cancelled from any of them. */
export const STATUS_ORDER: readonly RunStatusName[] = [
  'pending',
  'pendingGpu',
  'pendingImages',
  'pendingModel',
  'training',
  'completed',
];
const TERMINAL: ReadonlySet<RunStatusName> = new Set([
  'completed',
  'stalled',
  'failed',
  'cancelled',
]);
/** `^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`: gpu_runner/protocol.py's RunId. */
export const RUN_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
const STATUS_KEY = defineSearchAttributeKey('LoraTrainingStatus', SearchAttributeType.KEYWORD);
// Executions Temporal ended from outside: the run never reached a final status of its own.
const ENDED_FROM_OUTSIDE = new Set(['TERMINATED', 'TIMED_OUT']);
const RPC_TIMEOUT_MS = 10_000;

export class RunNotFound extends Error {}
export class RunExists extends Error {}
export class RunEnded extends Error {
  constructor(
    readonly runId: string,
    readonly executionStatus: string,
  ) {
    super(`run ${runId} already ended (${executionStatus}); nothing to cancel`);
  }
}
/** The run did not answer its status query: no worker polls its task queue. */
export class NoAnswer extends Error {}

/** Over for good: a final status, or an execution Temporal ended from outside. */
export function isFinal(status: RunStatus): boolean {
  return TERMINAL.has(status.status) || status.execution_status !== null;
}

/** `run-<utc time>-<random>`, as `loratrain train` names runs. */
export function newRunId(now: Date = new Date()): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
  return `run-${stamp}-${randomBytes(3).toString('hex')}`;
}

/**
 * A status with every key the schema requires (its defaults; lists empty), for a run that can no
 * longer answer its query. Built from the schema, so a field added to RunStatus needs no change.
 */
function bareStatus(
  runId: string,
  status: RunStatusName,
  executionStatus: string | null,
): RunStatus {
  const properties = runStatusSchema.properties as Record<
    string,
    { default?: unknown; type?: string }
  >;
  const bare = Object.fromEntries(
    Object.entries(properties).map(([name, field]) => [
      name,
      'default' in field ? field.default : field.type === 'array' ? [] : null,
    ]),
  );
  return { ...bare, run_id: runId, status, execution_status: executionStatus } as RunStatus;
}

export class Runs {
  private constructor(
    readonly client: Client,
    private readonly config: Config,
  ) {}

  static async connect(config: Config): Promise<Runs> {
    const connection = await Connection.connect({
      address: config.temporalAddress,
      connectTimeout: '10s',
    });
    const dataConverter: LoadedDataConverter = {
      payloadConverter: defaultPayloadConverter,
      // Failure messages can quote user input: they travel encrypted too (docs/codec.md).
      failureConverter: new DefaultFailureConverter({ encodeCommonAttributes: true }),
      payloadCodecs: [new AesGcmCodec({ [config.codecKeyId]: config.codecKey }, config.codecKeyId)],
    };
    const client = new Client({
      connection,
      namespace: config.namespace,
      // The client takes a loaded converter as it is (the SDK checks for `payloadConverter`);
      // its type names only the path-based form, which a failure converter instance cannot use.
      dataConverter: dataConverter as unknown as DataConverter,
    });
    return new Runs(client, config);
  }

  async close(): Promise<void> {
    await this.client.connection.close();
  }

  uiLink(runId: string): string {
    const ns = encodeURIComponent(this.config.namespace);
    return `${this.config.temporalUiUrl}/namespaces/${ns}/workflows/${encodeURIComponent(runId)}`;
  }

  private within<T>(ms: number, call: () => Promise<T>): Promise<T> {
    return this.client.connection.withDeadline(Date.now() + ms, call);
  }

  /** Starts the run; RunExists when any run, open or closed, ever had this id. */
  async start(runId: string, request: TrainingRequest): Promise<void> {
    try {
      await this.within(RPC_TIMEOUT_MS, () =>
        this.client.workflow.start(WORKFLOW_TYPE, {
          workflowId: runId,
          taskQueue: this.config.taskQueue,
          args: [request],
          // One run per run id, ever: a retried start never starts a second run.
          workflowIdConflictPolicy: 'FAIL',
          workflowIdReusePolicy: 'REJECT_DUPLICATE',
        }),
      );
    } catch (e) {
      if (e instanceof WorkflowExecutionAlreadyStartedError) {
        throw new RunExists(`run ${runId} already exists; not starting it again`);
      }
      throw e;
    }
  }

  private async describe(runId: string): Promise<WorkflowExecutionDescription> {
    try {
      return await this.within(RPC_TIMEOUT_MS, () =>
        this.client.workflow.getHandle(runId).describe(),
      );
    } catch (e) {
      if (e instanceof WorkflowNotFoundError) {
        throw new RunNotFound(
          `no run ${JSON.stringify(runId)} in namespace ${JSON.stringify(this.config.namespace)}`,
        );
      }
      throw e;
    }
  }

  /** The run's `status` query, as `loratrain status` reads it. */
  async status(runId: string): Promise<RunStatus> {
    const description = await this.describe(runId);
    const handle = this.client.workflow.getHandle(runId);
    const statusName = description.status.name;
    const endedFromOutside = ENDED_FROM_OUTSIDE.has(statusName);
    let status: RunStatus;
    try {
      status = await this.within(this.config.queryTimeoutMs, () =>
        handle.query<RunStatus>('status'),
      );
    } catch (e) {
      if (e instanceof CodecError || (e instanceof Error && e.cause instanceof CodecError)) {
        throw new CodecError(
          `cannot read run ${JSON.stringify(runId)}: ${e.message} (is LORA_CODEC_KEY the worker's?)`,
        );
      }
      if (statusName === 'COMPLETED') {
        // A completed run returns its final status; reading it needs no worker.
        return (await this.within(RPC_TIMEOUT_MS, () => handle.result())) as RunStatus;
      }
      const last = description.typedSearchAttributes.get(STATUS_KEY) as RunStatusName | undefined;
      if (endedFromOutside) {
        // No worker to replay it: what Temporal itself knows says how it ended.
        return bareStatus(
          runId,
          last && STATUS_ORDER.includes(last) ? last : 'pending',
          statusName.toLowerCase(),
        );
      }
      throw new NoAnswer(
        `run ${JSON.stringify(runId)} (${last ? `${last}, ` : ''}Temporal: ${statusName.toLowerCase()}) did not ` +
          `answer its status query within ${this.config.queryTimeoutMs / 1000} s: is a worker for task queue ` +
          `${JSON.stringify(description.taskQueue)} running (\`loratrain worker\` or \`loratrain dev\`)? ` +
          `(${e instanceof Error ? e.message : String(e)})`,
      );
    }
    if (endedFromOutside && !TERMINAL.has(status.status)) {
      return { ...status, execution_status: statusName.toLowerCase() };
    }
    return status;
  }

  /**
   * The `wait_for_change` update: the status once its version passes `afterVersion`, or
   * unchanged after `waitS` seconds (the run answers then, so no update outlives its caller).
   */
  async waitForChange(runId: string, afterVersion: number, waitS: number): Promise<RunStatus> {
    const handle = this.client.workflow.getHandle(runId);
    return this.within(waitS * 1000 + RPC_TIMEOUT_MS, () =>
      handle.executeUpdate<RunStatus, [number, number]>('wait_for_change', {
        args: [afterVersion, waitS],
      }),
    );
  }

  /** Temporal's cancel; the run gives its GPU back, then ends `cancelled`. */
  async cancel(runId: string): Promise<void> {
    const description = await this.describe(runId);
    if (description.status.name !== 'RUNNING') {
      throw new RunEnded(runId, description.status.name.toLowerCase());
    }
    await this.within(RPC_TIMEOUT_MS, () => this.client.workflow.getHandle(runId).cancel());
  }
}
