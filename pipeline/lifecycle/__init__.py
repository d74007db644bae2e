"""Model lifecycle: which version serves, changed while serving, the same on every replica.

`commands`: the control records and the rules every replica and the CLI fold them by;
`follower`: a replica's reader of the control topic; `admin`: the ``kp-pipeline
versions`` commands that write to it.
"""
