"""``rdswitch gvproxy``: gvisor-tap-vsock's gvproxy command line (v0.8.9), served by rdswitch's host-switch.

:mod:`.options` turns the command line (and a ``-config`` YAML file) into
host-switch's own argv plus what host-switch does not do itself (the pid
file, the log file, notifications, unix-socket forwards over SSH);
:mod:`.run` runs host-switch's nursery tree with those extra tasks.
"""
