"""What every loratrain process shares: settings, the data converter, the S3 and Temporal
clients built from them, and the logging setup. Imports no other package of the project."""
