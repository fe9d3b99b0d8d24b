"""The user's own side of the machine, shared by both ends of the socket: checks of who owns
banger's runtime directory and who serves (or calls) its socket (trust), banger's ssh_config
and the Include block the CLI puts in the user's ``~/.ssh/config`` (sshconfig), what a VM
name may be (names) and the end of a log (logtail). Stdlib only and importing nothing of
banger outside it, so the CLI and the client use the very checks the daemon uses without
reaching into the host adapters."""
