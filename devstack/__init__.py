"""The embedded stack (`loratrain dev`): Temporal's dev server, local S3, relay and worker as
children of one process."""
