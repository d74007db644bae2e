"""``--workers N``: N replicas in N processes, supervised by one command, one endpoint."""
