"""``python -m rdswitch sandbox``: a network namespace networked through rdswitch's real path.

:mod:`.options` parses and validates (pure), :mod:`.run` is the trio shell that
starts host-switch and network-setup and reports each stage, :mod:`.check` is
the self-check that runs inside as the namespace's init.
"""
