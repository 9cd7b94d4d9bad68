"""The Temporal worker process: every workflow and activity of loratrain on one task queue."""
