__version__ = "0.1.0"
#: How this software names itself to peers (identify) and in A1111 responses.
AGENT_VERSION = f"sdcn-p2p/{__version__}"
