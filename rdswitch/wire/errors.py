"""The one error type every wire codec raises for malformed input."""


class MalformedPacket(ValueError):
    """Input bytes do not form a valid packet of the expected protocol.

    The switch and gateway count these (by ``reason``) and drop the frame;
    they never take a session down.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
