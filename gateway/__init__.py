"""The gateway role: the HTTP APIs application developers call, and routing jobs to providers.

- `directory`: which providers can run a job, and which will finish it soonest.
- `dispatch`: send a job to the best provider, failing over when one is busy or dies.
- `api`, `a1111`: the SDCN HTTP API and the AUTOMATIC1111-compatible one (FastAPI).
- `node`: `Gateway`, `open_gateway`: the role on a Peer, serving HTTP.
"""
