"""The gateway role: the HTTP APIs application developers call, and routing jobs to providers.

Routing (no HTTP):

- `directory`: which providers can run a job, and which will finish it soonest (pure).
- `waitqueue`: the line of jobs waiting for a provider with room (pure).
- `dispatch`: send a job (or a batch) to the best provider, failing over when one is busy or
  dies; `errors`: the typed outcomes of a job that did not run.
- `catalog`: the models, LoRAs, samplers and providers on the network, for both APIs.

Trust (README.md, "Trust"):

- `compare`: whether two pictures are the same despite device jitter (pure).
- `trust`: each provider's record of spot checks, strikes and exclusions (pure).
- `spotcheck`: re-run a sample of jobs elsewhere, settle mismatches, verify on request.
- `fraud`: signed fraud reports (pure); `reports`: ``/sdcn/fraud/1.0.0``, sending them and
  checking those received with a re-run before believing them.

Jobs (every job, sync or async, is a record with events):

- `jobservice`: `JobService`, `open_job_service`: submit, run, follow, cancel, retention,
  restart, per-client quotas, providers' contributions; `admission`: the fair line of async
  jobs in front of the dispatcher (weighted deficit round robin by client, pure);
  `jobstore`: SQLite records, contributions and result files in the data dir.

Clients (pure but for reading the keys file):

- `access`: who is asking (API keys and tiers from the keys file, or an address);
  `limits`: what each client may do (`Limits`, token buckets) and is doing (`Quotas`).

Translating requests (pure):

- `sdcn`: SDCN API bodies to jobs (base64 init images).
- `a1111`: AUTOMATIC1111 payloads to jobs, and the webui's responses and options.

HTTP (FastAPI):

- `api`: `create_app`, made of `sdcn_api` (``/txt2img``, ``/v1/...``), `jobs_api`
  (``/v1/jobs``, with server-sent events), `a1111_api` (``/sdapi/v1/...``) and `ops_api`
  (``/metrics``, ``/v1/status``) over `http` (bodies, responses, errors to statuses in one
  place, and `AccessGate`: keys and request rates, before a route runs); `web_api` serves the
  pages in ``web/`` (``/``, ``/network``).

- `metrics`: what the gateway counts for Prometheus and ``/v1/status`` (the dispatcher's jobs
  and attempts, HTTP requests by API and status, providers by state).

- `node`: `Gateway`, `open_gateway`: the role on a Peer, serving HTTP.
"""
