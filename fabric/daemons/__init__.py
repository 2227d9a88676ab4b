"""The fabric daemons: primary server, media server, client; one module each."""
