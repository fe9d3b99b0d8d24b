"""The user's own side of the machine, shared by both ends of the socket: checks of who owns
banger's runtime directory and who serves (or calls) its socket, and the edit of the user's
``~/.ssh/config``. Stdlib only and importing nothing of banger, so the CLI and the client use
the very checks the daemon uses without reaching into the host adapters."""
