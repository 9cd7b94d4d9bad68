"""The webhook relay: signed runner events in, Temporal signals out; and the Temporal UI's codec
server."""
