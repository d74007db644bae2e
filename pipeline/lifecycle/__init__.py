"""Model lifecycle: which version serves, changed while serving, the same on every replica.

`commands`: the control records and the rules every replica and the CLI fold them by;
`follower`: a replica's reader of the control topic; `hotload`: loading, attaching and
retiring versions while a replica serves; `shadow`: comparing a candidate's answers with
the live ones; `admin`: the ``kp-pipeline versions`` commands that write to the topic.
"""
