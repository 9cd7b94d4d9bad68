// One watcher per run, shared by every stream that follows it: each watcher holds at most one
// `wait_for_change` update open (Temporal allows a run only a few in flight), whatever the
// number of browsers watching.
import type { RunStatus } from './generated/run-status.js';
import { isFinal, type Runs } from './runs.js';

export interface Listener {
  /** A status newer than any this listener was given. */
  status(status: RunStatus): void;
  /** The run is over: no status follows. */
  end(final: RunStatus): void;
  /** Reading the run failed for now (no worker, Temporal unreachable); the watcher keeps trying. */
  problem(message: string): void;
}

/** The longest one update waits before the run answers it unchanged (wait_for_change's wait_s). */
const WAIT_S = 50;
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 10_000;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

class Feed {
  readonly listeners = new Map<Listener, number>();
  latest: RunStatus | undefined;

  constructor(
    private readonly runs: Runs,
    private readonly runId: string,
  ) {}

  /** Hands `status` to every listener that has not seen its version yet. */
  offer(status: RunStatus): void {
    const fresher =
      this.latest === undefined ||
      status.version > this.latest.version ||
      (isFinal(status) && !isFinal(this.latest));
    if (!fresher) return;
    this.latest = status;
    for (const [listener, seen] of this.listeners) {
      if (status.version > seen) {
        this.listeners.set(listener, status.version);
        listener.status(status);
      }
      if (isFinal(status)) listener.end(status);
    }
    if (isFinal(status)) this.listeners.clear();
  }

  async follow(): Promise<void> {
    let retryMs = RETRY_FIRST_MS;
    while (this.listeners.size > 0 && !(this.latest && isFinal(this.latest))) {
      try {
        const next =
          this.latest === undefined
            ? await this.runs.status(this.runId)
            : await this.runs.waitForChange(this.runId, this.latest.version, WAIT_S);
        this.offer(next);
        retryMs = RETRY_FIRST_MS;
      } catch {
        // Refused while the run hands over to its next execution ("ask again"), or the run has
        // closed, or Temporal is unreachable: the status query says which.
        try {
          this.offer(await this.runs.status(this.runId));
        } catch (e) {
          const message = e instanceof Error ? e.message : String(e);
          for (const listener of this.listeners.keys()) listener.problem(message);
        }
        await sleep(retryMs);
        retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
      }
    }
  }
}

export class RunFeeds {
  private readonly feeds = new Map<string, Feed>();

  constructor(private readonly runs: Runs) {}

  /**
   * Follows the run for `listener` from `current` (a status just read) until the run is over;
   * `seenVersion` is the last version the listener already has (-1: none). Returns the
   * function that stops following.
   */
  subscribe(
    runId: string,
    current: RunStatus,
    seenVersion: number,
    listener: Listener,
  ): () => void {
    let feed = this.feeds.get(runId);
    const started = feed !== undefined;
    if (feed === undefined) {
      feed = new Feed(this.runs, runId);
      this.feeds.set(runId, feed);
    }
    feed.listeners.set(listener, seenVersion);
    feed.offer(current);
    const latest = feed.latest as RunStatus;
    // Still listed: `offer` did not already give it `current` as the final status.
    if (feed.listeners.has(listener)) {
      if (latest.version > (feed.listeners.get(listener) as number)) {
        feed.listeners.set(listener, latest.version);
        listener.status(latest);
      }
      if (isFinal(latest)) {
        feed.listeners.delete(listener);
        listener.end(latest);
      }
    }
    if (!started) {
      const running = feed;
      void running.follow().finally(() => {
        if (this.feeds.get(runId) === running) this.feeds.delete(runId);
      });
    }
    return () => feed.listeners.delete(listener);
  }
}
